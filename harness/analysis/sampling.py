"""Where a network's convolutions sample: layer geometry, learned sampling points, composition through layers.

Coordinates are *index coordinates* of a feature plane: pixel (row, col) of a plane has its centre at
(row, col). Every conv layer has an input plane and an output plane, each tied to the input image by an
affine map per axis (image index coordinate = scale · u + shift), found by walking the network's
`features`: a k×k max pool of stride s maps output u to the centre of its window, s·u − p + (k−1)/2; a
conv maps output u to its centre tap, s·u − p + d·(k−1)/2.

A conv layer with kernel k×k samples, for output position q, the input plane at
``stride · q − padding + dilation · (i, j) + Δp_(i,j)(q)`` for taps (i, j) — Δp = 0 for an ordinary conv,
the predicted offset for a deformable one (`DeformConv2d.predict`, torchvision's per-tap layout: tap
``k = i·kw + j``, channel 2k = Δy, 2k+1 = Δx; the shared 2-channel layout is expanded to it).

`compose_points` follows the DCN paper's figure: the k² points of the top layer land in the plane of the
layer below (through any pooling in between) at fractional positions; there each one spreads into that
layer's k² points, using the lower layer's offsets bilinearly interpolated at the fractional position
(equivalently the bilinear blend of the four neighbouring output pixels' sampling points); 3×3 through
3×3 gives 81 points. The result is mapped to input-image pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from harness.errors import HarnessError
from harness.models import conv_layers
from harness.ops import DeformConv2d, expand_shared_offset

Pair = tuple[float, float]


@dataclass(frozen=True)
class ConvGeometry:
    """One conv layer of a network and how its planes sit on the input image.

    `in_scale`/`in_shift` (per axis y, x) map the layer's input-plane index coordinates to image index
    coordinates; `out_scale`/`out_shift` do the same for its output plane.
    """

    index: int
    module: nn.Module
    deformable: bool
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_scale: Pair
    in_shift: Pair
    out_scale: Pair
    out_shift: Pair

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def in_to_image(self, points: np.ndarray) -> np.ndarray:
        """[..., 2] (y, x) input-plane coordinates → image index coordinates."""
        return points * np.asarray(self.in_scale) + np.asarray(self.in_shift)

    def out_to_image(self, points: np.ndarray) -> np.ndarray:
        return points * np.asarray(self.out_scale) + np.asarray(self.out_shift)

    def image_to_out(self, points: np.ndarray) -> np.ndarray:
        return (points - np.asarray(self.out_shift)) / np.asarray(self.out_scale)

    def tap_grid(self) -> np.ndarray:
        """[K, 2] (dy, dx) of each tap relative to the first, torchvision's tap order k = i·kw + j."""
        kh, kw = self.kernel
        ii, jj = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
        return np.stack([ii.ravel() * self.dilation[0], jj.ravel() * self.dilation[1]], axis=1).astype(np.float64)


def _as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = tuple(int(v) for v in value)
    return first, second


def _conv_of(module: nn.Module) -> nn.Module | None:
    """The conv of a conv block (`ConvBlock` keeps it at [0]) or the module itself if it is one."""
    if isinstance(module, nn.Conv2d | DeformConv2d):
        return module
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[0], nn.Conv2d | DeformConv2d):
        return module[0]
    return None


def sequential_geometry(model: nn.Module) -> list[ConvGeometry]:
    """Every conv layer of `model.features` (in order) with its plane-to-image maps, by walking the sequence.

    Knows conv blocks, `nn.Conv2d`, `DeformConv2d`, max/avg pooling, and modules that keep the geometry
    (BN, ReLU, dropout); anything else that could move pixels is an error rather than a silent mistake.
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise HarnessError(f"{type(model).__name__} has no `features` sequence to analyse")
    scale, shift = np.ones(2), np.zeros(2)
    layers: list[ConvGeometry] = []
    for module in features:
        conv = _conv_of(module)
        if conv is not None:
            kernel = _as_pair(conv.kernel_size)
            stride, padding, dilation = _as_pair(conv.stride), _as_pair(conv.padding), _as_pair(conv.dilation)
            # output u -> input stride*u - padding + dilation*(k-1)/2 (the centre tap)
            s = np.asarray(stride, dtype=np.float64)
            c = -np.asarray(padding, dtype=np.float64) + np.asarray(dilation) * (np.asarray(kernel) - 1) / 2
            out_scale, out_shift = scale * s, scale * c + shift
            layers.append(
                ConvGeometry(
                    len(layers), conv, isinstance(conv, DeformConv2d), kernel, stride, padding, dilation,
                    tuple(scale), tuple(shift), tuple(out_scale), tuple(out_shift),  # type: ignore[arg-type]
                )
            )
            scale, shift = out_scale, out_shift
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            kernel, stride = _as_pair(module.kernel_size), _as_pair(module.stride or module.kernel_size)
            padding = _as_pair(module.padding)
            dilation = _as_pair(getattr(module, "dilation", 1))
            s = np.asarray(stride, dtype=np.float64)
            c = -np.asarray(padding, dtype=np.float64) + np.asarray(dilation) * (np.asarray(kernel) - 1) / 2
            scale, shift = scale * s, scale * c + shift
        elif isinstance(module, nn.BatchNorm2d | nn.ReLU | nn.Dropout | nn.Identity):
            continue
        else:
            raise HarnessError(f"cannot map sampling positions through {type(module).__name__} in model.features")
    return layers


def _window_map(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(s, c) of a conv or pool: output u sits over input s·u + c (the centre of its window)."""
    kernel, padding = _as_pair(module.kernel_size), _as_pair(module.padding)  # type: ignore[arg-type]
    stride = _as_pair(module.stride or module.kernel_size)  # type: ignore[arg-type]
    dilation = _as_pair(getattr(module, "dilation", 1))
    s = np.asarray(stride, dtype=np.float64)
    return s, -np.asarray(padding, dtype=np.float64) + np.asarray(dilation) * (np.asarray(kernel) - 1) / 2


class _PlaneTracker:
    """Plane-to-image maps of the tensors of one forward pass: by tensor identity, else by plane size."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
        self.by_size: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def record(self, t: torch.Tensor, scale: np.ndarray, shift: np.ndarray) -> None:
        self.by_id[id(t)] = (t, scale, shift)
        self.by_size[(int(t.shape[-2]), int(t.shape[-1]))] = (scale, shift)

    def known(self, t: torch.Tensor) -> bool:
        entry = self.by_id.get(id(t))
        return entry is not None and entry[0] is t

    def lookup(self, t: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        if self.known(t):
            return self.by_id[id(t)][1], self.by_id[id(t)][2]
        return self.by_size.get((int(t.shape[-2]), int(t.shape[-1])))


def traced_geometry(model: nn.Module, image_size: int = 64) -> list[ConvGeometry]:
    """Every conv layer of any network (`harness.models.conv_layers` order) with its plane-to-image maps,
    found by following one forward pass of a blank image through convs and pools (residual branches too)."""
    convs = conv_layers(model)
    if not convs:
        raise HarnessError(f"{type(model).__name__} has no conv layers to analyse")
    conv_ids = {id(m) for _, m in convs}
    inner = {id(m) for _, c in convs if isinstance(c, DeformConv2d) for m in c.modules() if m is not c}
    planes, found = _PlaneTracker(), {}

    def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if not (args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor)
                and args[0].dim() == 4 and output.dim() == 4):
            return
        source = planes.lookup(args[0])
        if id(module) in conv_ids or isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            if source is None:
                raise HarnessError(f"cannot place the input of {type(module).__name__} on the image")
            s, c = _window_map(module)
            out_scale, out_shift = source[0] * s, source[0] * c + source[1]
            planes.record(output, out_scale, out_shift)
            found[id(module)] = (source[0], source[1], out_scale, out_shift)
        elif not planes.known(output) and source is not None and output.shape[-2:] == args[0].shape[-2:]:
            planes.record(output, *source)

    parameter = next(model.parameters())
    first = convs[0][1]
    x = torch.zeros(1, int(first.in_channels), image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    planes.record(x, np.ones(2), np.zeros(2))
    handles = [m.register_forward_hook(hook) for m in model.modules() if id(m) not in inner]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    layers = []
    for index, (name, conv) in enumerate(convs):
        if id(conv) not in found:
            raise HarnessError(f"conv{index} ({name}) does not run in a forward pass: cannot place it on the image")
        in_scale, in_shift, out_scale, out_shift = (tuple(float(v) for v in a) for a in found[id(conv)])
        layers.append(ConvGeometry(
            index, conv, isinstance(conv, DeformConv2d), _as_pair(conv.kernel_size), _as_pair(conv.stride),
            _as_pair(conv.padding), _as_pair(conv.dilation), in_scale, in_shift, out_scale, out_shift,  # type: ignore[arg-type]
        ))
    return layers


def conv_geometry(model: nn.Module, image_size: int = 64) -> list[ConvGeometry]:
    """Every conv layer of `model` with its plane-to-image maps, in the order of `harness.models.conv_layers`.

    A network whose `features` sequence holds all its convs is walked (exact, no forward pass); any other is
    traced with a blank `image_size` image.
    """
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        try:
            layers = sequential_geometry(model)
        except HarnessError:
            layers = []
        if layers and [id(g.module) for g in layers] == [id(m) for _, m in conv_layers(model)]:
            return layers
    return traced_geometry(model, image_size)


def per_tap_offsets(layer: DeformConv2d, offset: torch.Tensor) -> torch.Tensor:
    """A layer's predicted offsets in per-tap form [N, G, K, 2, Ho, Wo] ((Δy, Δx) per tap and group)."""
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    if layer.offset_channels == "shared":
        offset = expand_shared_offset(offset, taps)
    n, channels, ho, wo = offset.shape
    return offset.reshape(n, channels // (2 * taps), taps, 2, ho, wo)


def capture_offsets(
    model: nn.Module, x: torch.Tensor, layers: Sequence[int] | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Run `model` on `x` (no grad) and return {conv index: (offsets [N, G, K, 2, Ho, Wo], mask or None)}.

    Only deformable layers appear; `layers` restricts them to some conv indices. The offsets are what
    each layer predicts from the input it actually received in this forward pass.
    """
    geometry = conv_geometry(model, int(x.shape[-1]))
    wanted = {g.index for g in geometry if g.deformable and (layers is None or g.index in layers)}
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for g in geometry:
        if g.index in wanted:
            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], index: int = g.index) -> None:
                inputs[index] = args[0].detach()

            handles.append(g.module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
            out = {}
            for g in geometry:
                if g.index in inputs:
                    offset, mask = g.module.predict(inputs[g.index])  # type: ignore[operator]
                    taps = g.taps
                    m = None if mask is None else mask.reshape(mask.shape[0], -1, taps, *mask.shape[-2:])
                    out[g.index] = (per_tap_offsets(g.module, offset), m)  # type: ignore[arg-type]
    finally:
        for handle in handles:
            handle.remove()
    return out


def interpolate_field(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a field [..., Ho, Wo] at points [P, 2] (y, x) → [P, ...].

    Points outside the plane take the nearest border value (the field is only defined on the plane).
    """
    ho, wo = field.shape[-2:]
    y = np.clip(points[:, 0], 0.0, ho - 1.0)
    x = np.clip(points[:, 1], 0.0, wo - 1.0)
    y0 = np.clip(np.floor(y).astype(int), 0, max(ho - 2, 0))
    x0 = np.clip(np.floor(x).astype(int), 0, max(wo - 2, 0))
    y1, x1 = np.minimum(y0 + 1, ho - 1), np.minimum(x0 + 1, wo - 1)
    wy, wx = y - y0, x - x0
    moved = np.moveaxis(field, (-2, -1), (0, 1))  # [Ho, Wo, ...]
    extra = (slice(None),) + (None,) * (moved.ndim - 2)
    a, b = moved[y0, x0], moved[y0, x1]
    c, d = moved[y1, x0], moved[y1, x1]
    wy, wx = wy[extra], wx[extra]
    return (1 - wy) * ((1 - wx) * a + wx * b) + wy * ((1 - wx) * c + wx * d)


def sample_points(layer: ConvGeometry, q: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """Sampling points [P, K, 2] in `layer`'s input plane for output positions q [P, 2].

    `offsets` is the layer's per-tap offset field for one image and group, [K, 2, Ho, Wo] (None or
    zeros: an ordinary conv's fixed grid).
    """
    stride = np.asarray(layer.stride, dtype=np.float64)
    padding = np.asarray(layer.padding, dtype=np.float64)
    base = q[:, None, :] * stride - padding + layer.tap_grid()[None]
    if offsets is None:
        return base
    return base + interpolate_field(np.asarray(offsets, dtype=np.float64), q)


def compose_points(
    geometry: Sequence[ConvGeometry],
    chain: Sequence[int],
    position: Sequence[float],
    offsets: Mapping[int, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Sampling points of consecutive conv layers `chain` (conv indices, e.g. [0, 1]) composed top-down.

    `position` (y, x) is an output position of the top layer (max(chain)) in its output plane;
    `offsets` maps conv index → that layer's per-tap offsets for one image and group [K, 2, Ho, Wo]
    (layers without an entry sample their fixed grid). Returns a list of point sets in input-image
    index coordinates: [the position itself [1, 2], the top layer's K points [K, 2], K² points, ...].
    """
    order = sorted(set(int(i) for i in chain))
    if not order:
        raise HarnessError("compose_points: empty chain of layers")
    if order != list(range(order[0], order[-1] + 1)):
        raise HarnessError(f"compose_points: layers {order} are not consecutive conv layers")
    if order[-1] >= len(geometry):
        raise HarnessError(f"compose_points: the network has {len(geometry)} conv layers, asked for {order[-1]}")
    offsets = offsets or {}
    top = geometry[order[-1]]
    points = np.asarray(position, dtype=np.float64).reshape(1, 2)
    levels = [top.out_to_image(points)]
    for depth, index in enumerate(reversed(order)):
        layer = geometry[index]
        sampled = sample_points(layer, points, offsets.get(index)).reshape(-1, 2)  # in layer's input plane
        levels.append(layer.in_to_image(sampled))
        if depth + 1 < len(order):  # into the output plane of the conv below (through any pooling)
            below = geometry[index - 1]
            points = below.image_to_out(layer.in_to_image(sampled))
    return levels


def default_chain(geometry: Sequence[ConvGeometry], length: int = 2) -> list[int]:
    """The top-most run of `length` consecutive deformable conv layers (shorter if no such run exists)."""
    deform = [g.index for g in geometry if g.deformable]
    if not deform:
        return []
    best: list[int] = [deform[-1]]
    for index in reversed(deform):
        run = [index]
        while len(run) < length and run[0] - 1 in deform:
            run.insert(0, run[0] - 1)
        if len(run) > len(best):
            best = run
        if len(best) == length:
            break
    return best
