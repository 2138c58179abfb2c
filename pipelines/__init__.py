"""Model families sparsediff plugs into: diffusers video pipeline adapters (processors, step hook, install/remove)."""
