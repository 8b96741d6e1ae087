"""The typed config tree: sections as dataclasses (`common`, `nvae`, `ebm`), YAML presets and dotted overrides
(`loader`). Import-light: no torch, no Accelerate."""
