"""`cifar10`: CIFAR-10 (Krizhevsky, 2009), a CIFAR ResNet-34 reference and a ResNet-18 student.

A *full* task: the data is the real CIFAR-10 in its python-pickle folder `cifar-10-batches-py`
(data_batch_1..5, test_batch, batches.meta) under `$BENCH_DATA` (default `<bench cache>/data`), 50,000
train / 10,000 test images, the files and md5s of `torchvision.datasets.CIFAR10`, read as it reads them (but
without unpickling: below). Nothing is downloaded at run time: a missing folder is an error that names the
one-liner to download it once. Training the reference takes tens of minutes of a GPU, so use a GPU profile
(`--profile h100-bf16`); on a CPU the full recipe takes days, so there the CPU profile is for test fixtures and
`--budget smoke` (20 steps of each training).

What torchvision lacked, and what this module adds around it:
- its error ("Dataset not found or corrupted. You can use download=True") neither says where it looked nor
  which file is missing or corrupted, and suggests a download at run time; ours says both, with the command;
- it reads the files with `pickle.load`, which runs whatever function a tampered file names, and only its md5
  check stood in the way. Here they are read by a restricted unpickler (`read_batch`) that builds dicts,
  lists, text and numbers, and uint8 arrays from their raw bytes (numpy's own unpickling never runs): a file
  that names anything else is refused, naming it, and nothing in it runs;
- its md5 check cannot be turned off (the meta file's check is hard-coded in `_load_meta`), so tests could
  not use small fixture files in the real format. `BENCH_CIFAR10_VERIFY=0` (or `verify_md5 = False` on a
  subclass) is the explicit opt-in to check that the files exist instead: for copies you made yourself (or
  fixtures). A file that is not CIFAR-10's is then read as far as the restricted unpickler allows, never run;
- it yields one PIL image per item; we take its whole arrays at once as in-memory tensors, as `digits` does;
- its models are ImageNet ResNets (7x7 stride-2 stem and a max-pool, which throw away most of a 32x32
  image); the CIFAR variant below swaps the stem for a 3x3 stride-1 conv and drops the max-pool.

Reference: ResNet-34 (21.3 M parameters); student: ResNet-18 (11.2 M), a common teacher/student pair of
CIFAR knowledge-distillation work, with the CIFAR stem of e.g. kuangliu/pytorch-cifar. The task has no
committed reference artifact: the first run trains it into the cache (`Task.reference_weights`), or
`BENCH_CIFAR10_REFERENCE=/path/to/weights.safetensors` supplies one (a state dict of `build_reference()`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bench.api import Sections
from bench.registry import register_task
from tasks.base import ReferenceWeights, RunContext
from tasks._kit.classification import ImageClassificationTask, Split, TrainRecipe

if TYPE_CHECKING:
    import torch

BASE_FOLDER = "cifar-10-batches-py"
FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
         "batches.meta")
# Per-channel mean and standard deviation of the 50,000 training images' pixels, in [0, 1]. (The
# (0.2023, 0.1994, 0.2010) often copied as "the CIFAR std" is the std of per-image means, not of pixels.)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4  # random-crop padding of the classic augmentation (He et al. 2016, section 4.2)


class CIFAR10NotFound(FileNotFoundError):
    """The CIFAR-10 folder, or a file in it, is missing."""


class CIFAR10Corrupt(RuntimeError):
    """A CIFAR-10 file does not have the md5 torchvision records for it."""


class ReferenceWeightsError(ValueError):
    """`BENCH_CIFAR10_REFERENCE` names a file that is not a state dict of this task's reference."""


def data_root() -> Path:
    """The directory that holds `cifar-10-batches-py`: `$BENCH_DATA`, else `<bench cache>/data`."""
    from bench import cache

    env = os.environ.get("BENCH_DATA")
    return Path(env).expanduser() if env else cache.cache_dir() / "data"


def download_command(root: Path) -> str:
    return f"python -c \"import torchvision; torchvision.datasets.CIFAR10({str(root)!r}, download=True)\""


def _numpy_placeholders():
    """What a CIFAR file's globals stand for while it is read: records of the arguments and state, from which
    `_array` builds the array itself (so numpy's unpickling of a dtype or an array, which trusts its input,
    never sees the file's)."""

    class Dtype:
        def __init__(self, spec, *args):
            self.spec = spec

        def __setstate__(self, state):
            self.state = state

    class Array:
        def __init__(self, subtype, shape, code):
            if subtype is not NdArray:
                raise TypeError("an array of another type than numpy.ndarray")

        def __setstate__(self, state):
            self.state = state

    class NdArray:  # numpy.ndarray as an argument only: calling it (an allocation of any size) fails
        def __init__(self):
            raise TypeError("numpy.ndarray called directly")

    return Dtype, Array, NdArray


def _array(a, what: str):
    """A uint8 numpy array from an unpickled ndarray record: (version, shape, dtype, fortran, raw bytes)."""
    import numpy as np

    state = getattr(a, "state", None)
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise CIFAR10Corrupt(f"{what}: an array without its data")
    shape, dtype, fortran, raw = state[-4:]
    if getattr(dtype, "spec", None) not in ("u1", "|u1", "uint8"):
        raise CIFAR10Corrupt(f"{what}: an array of {getattr(dtype, 'spec', dtype)!r}; CIFAR-10's images are uint8")
    raw = raw.encode("latin1") if isinstance(raw, str) else raw
    if (not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(raw, (bytes, bytearray)) or len(raw) != int(np.prod(shape, dtype=np.int64))):
        raise CIFAR10Corrupt(f"{what}: an array whose shape {shape!r} does not match its data")
    x = np.frombuffer(bytes(raw), dtype=np.uint8)
    return (x.reshape(shape[::-1]).T if fortran else x.reshape(shape)).copy()


def read_batch(path: Path) -> dict:
    """One file of `cifar-10-batches-py` (Python 2 pickles: a dict of text, numbers, lists and uint8 arrays),
    read without running anything from it: the unpickler knows four globals, numpy's array and dtype
    reconstructors, each standing for a record of its arguments, and refuses every other one."""
    import pickle

    Dtype, Array, NdArray = _numpy_placeholders()
    known = {("numpy.core.multiarray", "_reconstruct"): Array, ("numpy._core.multiarray", "_reconstruct"): Array,
             ("numpy", "ndarray"): NdArray, ("numpy", "dtype"): Dtype}

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in known:
                return known[(module, name)]
            raise CIFAR10Corrupt(f"{path} names {module}.{name}, which a CIFAR-10 file never holds: refused, and "
                                 f"nothing in it was run (a tampered or foreign file; download CIFAR-10 again)")

    try:
        with open(path, "rb") as f:
            entry = Restricted(f, encoding="latin1").load()
    except CIFAR10Corrupt:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a malformed pickle raises, it is a corrupt file
        raise CIFAR10Corrupt(f"{path} is not a CIFAR-10 batch file ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict):
        raise CIFAR10Corrupt(f"{path} is not a CIFAR-10 batch file (it holds a {type(entry).__name__})")
    return {k: _array(v, f"{path} [{k!r}]") if isinstance(v, Array) else v for k, v in entry.items()}


def read_cifar10(folder: Path, verify: bool) -> tuple:
    """(train images, train labels, test images, test labels, class names) of `cifar-10-batches-py`: images
    uint8 N x 32 x 32 x 3 as torchvision holds them; every file md5-checked against torchvision's table first
    when `verify`."""
    import numpy as np
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    files = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    bad = [name for name, md5 in files if not check_integrity(str(folder / name), md5 if verify else None)]
    if bad:
        raise CIFAR10Corrupt(
            f"CIFAR-10 file(s) {', '.join(bad)} in {folder} do not match torchvision's md5. Delete {folder} and "
            f"download it again with:\n  {download_command(folder.parent)}")

    def split(names):
        data, labels = [], []
        for name, _ in names:
            entry = read_batch(folder / name)
            x, y = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
            if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 3072 or not isinstance(y, list) \
                    or len(y) != x.shape[0] or not all(isinstance(v, int) for v in y):
                raise CIFAR10Corrupt(f"{folder / name} does not hold `data` (N x 3072 uint8) and N integer `labels`")
            data.append(x)
            labels += y
        return np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    train_x, train_y = split(CIFAR10.train_list)
    test_x, test_y = split(CIFAR10.test_list)
    meta = read_batch(folder / CIFAR10.meta["filename"])
    classes = meta.get(CIFAR10.meta["key"])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CIFAR10Corrupt(f"{folder / CIFAR10.meta['filename']} does not hold the class names "
                             f"(`{CIFAR10.meta['key']}`)")
    return train_x, train_y, test_x, test_y, classes


def _to_split(images, labels) -> Split:
    """uint8 N x 32 x 32 x 3 (HWC, as torchvision holds it) -> normalised float N x 3 x 32 x 32."""
    import numpy as np
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(torch.float32)  # one 614 MB copy
    x = x.div_(255).sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))
    return Split(x, torch.as_tensor(np.asarray(labels, dtype=np.int64)))


def cifar_resnet(depth: int, num_classes: int = 10) -> "torch.nn.Module":
    """torchvision's ResNet-18/34 with the CIFAR stem: a 3x3 stride-1 conv, no max-pool."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock, ResNet

    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    model = ResNet(BasicBlock, layers, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits
    model.maxpool = nn.Identity()
    return model


@register_task("cifar10", modality="image-classification", tier="full", metric="top1_accuracy",
               higher_is_better=True, version="1",
               summary="CIFAR-10 (real data, user-downloaded); ResNet-34 reference vs a ResNet-18 student")
class CIFAR10(ImageClassificationTask, Sections):
    reference_sha256 = None  # no committed artifact: trained into the cache, or BENCH_CIFAR10_REFERENCE
    verify_md5 = True  # check every file against torchvision's md5; BENCH_CIFAR10_VERIFY=0 turns it off
    # `fit` trains with Adam and a cosine schedule to zero (it has no SGD). The usual CIFAR ResNet recipe
    # (e.g. kuangliu/pytorch-cifar) is SGD, momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, 200 epochs
    # of cosine. We keep its batch, epochs and decay, with Adam's usual lr. Cost, estimated from the MACs
    # (ResNet-34 1.16 G, ResNet-18 0.56 G per image; a training step ~3x a forward) and not yet measured on
    # a GPU: ~10 s an epoch of the reference on an H100 in fp32, so ~35 min once (then it is cached).
    # Neither recipe has been validated on the real data yet (SGD gets ~95% top-1 from this ResNet-34;
    # expect Adam to land somewhat below).
    recipe = TrainRecipe(
        epochs=200,  # the classic schedule's length; the reference is trained once and cached
        lr=1e-3,  # Adam's default step size (SGD's 0.1 does not transfer to Adam)
        batch_size=128,  # the classic CIFAR batch
        weight_decay=5e-4,  # the classic value, applied by Adam as L2 on the gradient
    )
    # Every cifar10 student (kd and its label-only control alike) trains with this. Same values as the
    # reference, so a distilled ResNet-18 is compared with a ResNet-18 given the teacher's full budget;
    # estimated ~5 s an epoch on an H100 (~7 s with kd's teacher forward): ~25 min a kd run, plus ~15 min
    # once for its label-only control (cached per seed).
    student_recipe = TrainRecipe(epochs=200, lr=1e-3, batch_size=128, weight_decay=5e-4)

    def __init__(self) -> None:
        self._loaded = False
        self.classes: list[str] = []

    # ---- data ---------------------------------------------------------------------------------------------
    @property
    def verify(self) -> bool:
        return self.verify_md5 and os.environ.get("BENCH_CIFAR10_VERIFY", "1").strip() != "0"

    def load(self, ctx: RunContext | None = None) -> None:
        if self._loaded:
            return
        root = data_root()
        folder = root / BASE_FOLDER
        missing = [f for f in FILES if not (folder / f).is_file()]
        if missing:
            what = (f"no folder {folder}" if not folder.is_dir() else
                    f"{folder} lacks {', '.join(missing)}")
            raise CIFAR10NotFound(
                f"CIFAR-10 data not found: {what}. The cifar10 task never downloads at run time. Download it "
                f"once (~170 MB) with:\n  {download_command(root)}\nor set BENCH_DATA to the directory that "
                f"holds {BASE_FOLDER}/.")
        train_x, train_y, test_x, test_y, self.classes = read_cifar10(folder, self.verify)
        self.train = _to_split(train_x, train_y)
        self.test = _to_split(test_x, test_y)
        for name, split in (("train", self.train), ("test", self.test)):
            if split.y.numel() and not (0 <= int(split.y.min()) and int(split.y.max()) < 10):
                raise CIFAR10Corrupt(f"CIFAR-10 {name} labels outside 0..9 in {folder}")
        self._loaded = True

    def augment(self, x: "torch.Tensor", gen: "torch.Generator") -> "torch.Tensor":
        """Random 32x32 crop of the image padded by 4 black pixels, then a horizontal flip with p = 1/2.

        Padding is black in pixel space (torchvision's RandomCrop(32, padding=4) before Normalize), i.e.
        -mean/std per channel here. All randomness is drawn from `gen` (on the CPU), so a batch's
        augmentation is fixed by the generator's state whatever device `x` lives on.
        """
        import torch

        n, c, h, w = x.shape
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=gen)
        flip = torch.rand(n, generator=gen) < 0.5
        black = (-torch.tensor(MEAN) / torch.tensor(STD)).to(device=x.device, dtype=x.dtype)
        padded = black.view(1, c, 1, 1).repeat(n, 1, h + 2 * PAD, w + 2 * PAD)
        padded[:, :, PAD:PAD + h, PAD:PAD + w] = x
        offsets, flip = offsets.to(x.device), flip.to(x.device)
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        cols = torch.where(flip.view(n, 1, 1, 1), cols.flip(-1), cols)  # flip = read the columns backwards
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        idx_c = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[idx_n, idx_c, rows, cols]

    # ---- models -------------------------------------------------------------------------------------------
    def build_reference(self):
        return cifar_resnet(34)

    def build_student(self):
        return cifar_resnet(18)

    @property
    def reference_recipe(self) -> TrainRecipe:  # the Sections capability's name for the reference's recipe
        return self.recipe

    def sections(self, model):
        """The stem with ResNet's first stage (64 x 32 x 32), its other three stages (128 x 16 x 16, 256 x 8 x 8,
        512 x 4 x 4), and the head (average pool, flatten, fc): torchvision's `ResNet.forward` step for step,
        on the model's own modules."""
        from torch import nn

        return [nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1), model.layer2,
                model.layer3, model.layer4, nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)]

    def reference_weights(self, ctx: RunContext) -> ReferenceWeights:
        """`BENCH_CIFAR10_REFERENCE` when set; else the reference trained into the cache on first use."""
        env = os.environ.get("BENCH_CIFAR10_REFERENCE")
        if env:
            return self._user_reference(Path(env).expanduser())
        return super().reference_weights(ctx)

    def _user_reference(self, path: Path) -> ReferenceWeights:
        from safetensors import SafetensorError
        from safetensors.torch import load

        from bench import cache

        hint = (f"BENCH_CIFAR10_REFERENCE={path} must be a safetensors file holding the state dict of "
                f"tasks.cifar10.cifar_resnet(34) (save it with safetensors.torch.save_file(model.state_dict(), "
                f"path))")
        if not path.is_file():
            raise ReferenceWeightsError(f"{hint}, and there is no such file")
        blob = path.read_bytes()
        try:
            state = load(blob)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ReferenceWeightsError(f"{hint}; it could not be read as safetensors: {e}") from e
        expected = self.build_reference().state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if missing or unexpected or wrong:
            def few(keys: list[str]) -> str:
                return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

            parts = [f"missing keys: {few(missing)}" if missing else "",
                     f"unexpected keys: {few(unexpected)}" if unexpected else "",
                     f"wrong shapes: {few(wrong)}" if wrong else ""]
            raise ReferenceWeightsError(f"{hint}; it does not match: {'; '.join(p for p in parts if p)}")
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
        return ReferenceWeights(state, cache.sha256_bytes(blob), False, str(path))
