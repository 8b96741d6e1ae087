"""Parameter-name mapping from the official NVAE checkpoint layout to this implementation.

The official model keeps its towers as flat lists that interleave cells and combiners
(`enc_tower.7`, `dec_tower.13`, ...); here they are grouped per latent group. This module only
renames tensors (shapes are identical); reading the file, the `args` → `NVAEConfig`
translation and the completeness checks belong to the importer (`trainer/official/nvae.py`).
The layout is listed in `tests/fixtures/official-state-dicts.json` (every official tensor's name and
shape); the names below were derived from that listing.

Two kinds of tensors exist on one side only:
- official `*.weight_normalized`: aliases of `*.weight` for the convs built without weight
  normalization (the MBConv convs); the same tensor twice, so they are checked and dropped.
- ours `spectral.*` (the power-iteration vectors, which the official model keeps outside its state
  dict) and `*.data_init_done` (the data-dependent-init flags); the importer keeps fresh ones.
"""
from __future__ import annotations

import re

import torch

from models.nvae.config import NVAEConfig

# Sub-names inside one official cell → ours.
_ENCODER_CELL = {
    "_ops.0.bn_act": "bn1", "_ops.0.conv_0": "conv1", "_ops.1.bn_act": "bn2", "_ops.1.conv_0": "conv2",
    "se.se.0": "se.fc1", "se.se.2": "se.fc2",
    "skip.conv_1": "skip.convs.0", "skip.conv_2": "skip.convs.1", "skip.conv_3": "skip.convs.2", "skip.conv_4": "skip.convs.3",
}
_MBCONV = ("bn_in", "conv_expand", "bn_expand", "conv_depthwise", "bn_depthwise", "conv_project", "bn_out")
_MBCONV_OPS = ("conv.0", "conv.1.conv.0", "conv.1.conv.1", "conv.2.conv.0", "conv.2.conv.1", "conv.3", "conv.4")
_MBCONV_OPS_UP = ("conv.1", "conv.2.conv.0", "conv.2.conv.1", "conv.3.conv.0", "conv.3.conv.1", "conv.4", "conv.5")
_FLOW = {"conv.convz.0": "conv_in", "conv.convz.2": "conv_depthwise", "mu.conv_0": "conv_mu"}
ALIAS_SUFFIX = ".weight_normalized"


def official_aliases(names) -> dict[str, str]:
    """{alias: the official name it aliases} for every `*.weight_normalized` entry among `names`."""
    return {name: name[: -len(ALIAS_SUFFIX)] + ".weight" for name in names if name.endswith(ALIAS_SUFFIX)}


def ours_only(name: str) -> bool:
    """True for a tensor of our NVAE that no official checkpoint holds (see the module docstring)."""
    return name.startswith("spectral.") or name.endswith(".data_init_done")


def _mbconv_map(upsample: bool) -> dict[str, str]:
    ops = _MBCONV_OPS_UP if upsample else _MBCONV_OPS
    table = {f"_ops.0.{o}": ours for o, ours in zip(ops, _MBCONV)}
    table.update({"se.se.0": "se.fc1", "se.se.2": "se.fc2", "skip.1": "skip.conv"})
    return table


def _tower_layouts(cfg: NVAEConfig) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(official enc_tower entries, official dec_tower entries) as (our prefix, sub-name table)."""
    groups = cfg.groups_per_scale_encoder_order()
    total = sum(groups)
    encoder, g = [], 0
    for scale, count in enumerate(groups):
        for _ in range(count):
            encoder += [(f"encoder_groups.{g}.{c}", _ENCODER_CELL) for c in range(cfg.cells_per_cond_enc)]
            if g < total - 1:  # combiner k (bottom-up) serves decoder group total-1-k
                encoder.append((f"enc_combiners.{total - 2 - g}", {"conv": "conv"}))
            g += 1
        if scale < len(groups) - 1:
            encoder.append((f"encoder_down.{scale}", _ENCODER_CELL))
    decoder, g = [], 0
    for scale, count in enumerate(reversed(groups)):
        if scale > 0:
            decoder.append((f"decoder_up.{scale - 1}", _mbconv_map(True)))
        for _ in range(count):
            if g > 0:
                decoder += [(f"decoder_groups.{g}.{c}", _mbconv_map(False)) for c in range(cfg.cells_per_cond_dec)]
            decoder.append((f"dec_combiners.{g}", {"conv": "conv"}))
            g += 1
    return encoder, decoder


def _rename(rest: str, table: dict[str, str]) -> str | None:
    for theirs in sorted(table, key=len, reverse=True):
        if rest.startswith(theirs + "."):
            return table[theirs] + rest[len(theirs):]
    return None


def official_to_ours(state_dict: dict[str, torch.Tensor], cfg: NVAEConfig) -> dict[str, torch.Tensor]:
    """Rename an official NVAE (res_mbconv, Gaussian decoder) state dict to this model's names.

    `*.weight_normalized` aliases are dropped. Raises KeyError on a name it cannot place.
    """
    encoder, decoder = _tower_layouts(cfg)
    post = [(f"postprocess.{i}", _mbconv_map(i % cfg.postprocess_cells == 0))
            for i in range(cfg.postprocess_blocks * cfg.postprocess_cells)]
    pre = [(f"preprocess.{i}", _ENCODER_CELL) for i in range(cfg.preprocess_blocks * cfg.preprocess_cells)]
    towers = {"enc_tower": encoder, "dec_tower": decoder, "post_process": post, "pre_process": pre}
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith(ALIAS_SUFFIX):
            continue
        ours = None
        match = re.match(r"(enc_tower|dec_tower|post_process|pre_process)\.(\d+)\.(.+)", name)
        if match and int(match.group(2)) < len(towers[match.group(1)]):
            prefix, table = towers[match.group(1)][int(match.group(2))]
            rest = _rename(match.group(3), table)
            ours = None if rest is None else f"{prefix}.{rest}"
        elif name == "prior_ftr0" or name.startswith("stem."):
            ours = name
        elif m := re.match(r"enc0\.1\.(.+)", name):
            ours = f"encoder_top.conv.{m.group(1)}"
        elif m := re.match(r"enc_sampler\.(\d+)\.(.+)", name):
            ours = f"enc_samplers.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"dec_sampler\.(\d+)\.1\.(.+)", name):
            ours = f"dec_samplers.{m.group(1)}.conv.{m.group(2)}"
        elif m := re.match(r"image_conditional\.1\.(.+)", name):
            ours = f"output_head.conv.{m.group(1)}"
        elif (m := re.match(r"nf_cells\.(\d+)\.cell([12])\.(.+)", name)) and cfg.num_flows > 0:
            group, flow = divmod(int(m.group(1)), cfg.num_flows)
            cell = "forward_cell" if m.group(2) == "1" else "backward_cell"
            rest = _rename(m.group(3), _FLOW)
            ours = None if rest is None else f"flows.{group}.{flow}.{cell}.{rest}"
        if ours is None:
            raise KeyError(f"cannot place official NVAE tensor {name!r}")
        if ours in out:
            raise KeyError(f"official NVAE tensor {name!r} lands on {ours!r}, which another tensor already filled")
        out[ours] = tensor
    return out
