"""`harness bench` runs and reports sane numbers (tiny shapes; no speed assertions)."""

from __future__ import annotations

import json

import pytest

from harness.bench import LayerShape, bench_model, bench_ops
from harness.cli import main
from harness.errors import HarnessError


def test_bench_ops_rows_and_ratio():
    impls = ("conv2d", "per_tap", "shared", "torchvision", "im2col_gemm")
    rows = bench_ops([LayerShape(1, 4, 4, 8)], impls, warmup=1, reps=1)
    assert [r.impl for r in rows] == list(impls)
    assert rows[0].ratio_to_conv2d == pytest.approx(1.0)
    assert all(r.ms > 0 for r in rows)


def test_interleaved_ms_takes_turns_in_blocks(monkeypatch):
    """Cases run in turns, one block each per round with a synchronize after it; the result is the
    median of the per-call block times."""
    import harness.bench

    order: list[str] = []
    clock = iter(range(1000))
    monkeypatch.setattr(harness.bench.time, "perf_counter", lambda: float(next(clock)))
    cases = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    ms = harness.bench.interleaved_ms(cases, rounds=3, block=2, warmup=1, synchronize=lambda: order.append("sync"))
    assert order == ["a", "b", "sync"] + ["a", "a", "sync", "b", "b", "sync"] * 3
    assert ms == {"a": pytest.approx(500.0), "b": pytest.approx(500.0)}  # one tick per block of 2 calls


def test_bench_ops_in_turns_gives_conv2d_ratios():
    """The GPU's way of timing (`_interleaved_rows`), run on the CPU."""
    from harness.bench import _interleaved_rows

    rows = _interleaved_rows(LayerShape(1, 4, 4, 8), ("per_tap", "shared"), rounds=2, memory=False, progress=None,
                             device="cpu", amp="none")
    assert [r.impl for r in rows] == ["per_tap", "shared"]
    assert all(r.ms > 0 and r.ratio_to_conv2d > 0 and r.peak_mb is None for r in rows)


def test_bench_ops_memory_probe():
    """The probe reports the extra memory of one forward+backward: at least the layer's output, which the
    step has to hold, and far below the RSS of the process around it (hundreds of MiB with torch loaded)."""
    shape = LayerShape(4, 16, 16, 64)
    rows = bench_ops([shape], ("conv2d", "per_tap"), warmup=0, reps=1, memory=True)
    output_mb = shape.n * shape.o * shape.size**2 * 4 / 2**20  # 1 MiB of fp32
    for r in rows:
        assert r.peak_mb is not None and output_mb <= r.peak_mb < 32 * output_mb, (r.impl, r.peak_mb)


def test_bench_model_relative_to_first():
    rows = bench_model(["none", "first:1"], image_size=32, batch=2, arch="small3", warmup=0, reps=1)
    assert rows[0].relative_to_standard == pytest.approx(1.0)
    assert rows[1].images_per_s > 0
    assert rows[1].relative_to_standard == pytest.approx(rows[1].images_per_s / rows[0].images_per_s)


def test_bench_model_refuses_a_width_the_arch_does_not_take():
    """--width scales the harness's own networks; a ResNet keeps torchvision's widths, so asking for another
    is a one-line error rather than a figure for a network that was not built."""
    with pytest.raises(HarnessError, match="--width scales unet_encoder and small3 only; resnet18"):
        bench_model(["none"], image_size=32, batch=2, arch="resnet18", width=0.5, warmup=0, reps=1)


def test_bench_model_interleaves_the_placements(monkeypatch):
    """Each timed round runs one step of every placement, so all get the same number of steps and a
    drifting machine slows them alike: the order of the models' steps alternates."""
    import harness.bench

    order = []
    real = harness.bench.create_model

    def tracked(arch, *, deform_layers, **kwargs):
        model = real(arch, deform_layers=deform_layers, **kwargs)
        model.register_forward_pre_hook(lambda *_: order.append(deform_layers))
        return model

    monkeypatch.setattr(harness.bench, "create_model", tracked)
    rows = bench_model(["none", "first:1"], image_size=32, batch=2, arch="small3", warmup=1, reps=3)
    assert rows[0].steps == rows[1].steps >= 3
    timed = order[2:]  # after one warm-up step each
    assert timed[:6] == ["none", "first:1"] * 3


def test_cli_bench_ops_json(capsys):
    code = main(["bench", "ops", "--shape", "1,4,4,8", "--impl", "conv2d", "--impl", "shared",
                 "--reps", "1", "--warmup", "0", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in data["rows"]] == ["conv2d", "shared"]
    assert "cpu" in data["machine"]


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "1,2,3,0"])
def test_bad_shape(text):
    with pytest.raises(HarnessError, match="N,C,O,H"):
        LayerShape.parse(text)


def test_cli_bad_shape_is_one_line_exit_2(capsys):
    assert main(["bench", "ops", "--shape", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_every_command_has_help(capsys):
    for argv in (["--help"], ["bench", "--help"], ["bench", "ops", "--help"], ["bench", "model", "--help"]):
        assert main(argv) == 0
    assert "Forward+backward" in capsys.readouterr().out
