"""What one ImageNet-256 FID-50k evaluation and one code extraction cost, phase by phase.

Evaluation: ``movegen evaluate --reference X.npz`` as the recipe runs it (``evaluate.evaluate_model``,
one process): GPT-B (``configs/imagenet/gpt-b-*.yaml``: K = 16384, 16 x 16 = 256 tokens, 1000
classes), CFG 2.0, temperature 1, the sampler's fast path (one CUDA graph per token step),
LlamaGen's VQ-16 decoding to 256 x 256, torch-fidelity's FID InceptionV3 (pool features, logits,
the sFID layer), then FID / sFID / IS / KID / precision-recall against an ADM-style reference
batch. The library's own functions run unchanged; the phases are timed by wrapping the calls
``evaluate_model`` makes (the device synchronised at each boundary; a call inside another counts
for its own phase only):

    setup        loading model.ckpt and tokenizer.ckpt, building the Inception networks
    ref load     reading the reference .npz and hashing it (the features' cache key)
    sample       the token loop (codes, the counter-based noise drawn inside each replayed
                 step), without graph capture and decoding
    capture      compiling the step and capturing its CUDA graphs: once (a short last batch
                 runs padded on the full batch's step)
    decode       VQ-16 decoding of the codes to images (and nothing else; a row marked
                 ``compiled`` decodes through ``tokenizer.CompiledDecode``, its compilation
                 included here), each batch after its
                 sampling; a row marked ``overlap`` decodes each batch on a second stream while
                 the next one samples (``generate_images(overlap=True)``): its decode is inside
                 ``sample`` (timing it apart would mean synchronising, which undoes the overlap)
    inception    the samples through InceptionV3: pool features, IS logits, sFID features
    ref feats    the reference's arr_0 images through InceptionV3 (a fresh cache every row)
    scoring      FID/sFID from statistics, KID, precision/recall (k-NN), IS
    other        the rest of the total (copies, the crop, concatenations)

Extraction: ``movegen extract-codes`` (``cli.extract_codes``, the CLI's function) with VQ-16 over
a synthetic ImageNet-like folder (JPEGs of random sizes around 400 x 350 in class folders,
written first), 256 x 256 -> 16 x 16 codes, views 2 (each image and its flip) and ten-crop
(``--ten_crop true``: 10 views), with ``--num_workers`` DataLoader processes; beside it, the
same DataLoader alone (JPEG decoding, crop, resize: the CPU side) and the encoder alone (GPU side).

Every weight is random (the networks' own initialisations; a random-valued Inception weights
file in torch-fidelity's layout), so the scores are meaningless: only the times count. The
reference batch is written here with random ``mu``/``sigma``/``mu_s``/``sigma_s`` and
``--ref_images`` random uint8 images (default 10,000: the size of ADM's
``VIRTUAL_imagenet256_labeled.npz`` arr_0). Needs torch-fidelity (``pip install torch-fidelity``).
The extraction runs first (the short part: a time limit that cuts the evaluation off loses only
the evaluation); a row that runs out of GPU memory is reported as OOM with the phases timed so
far (batch 1024 did on an H200 while the VQ decode took a whole batch at once; it now
decodes 256 at a time: ``sample.DECODE_BATCH``).

    python -m benchmarks.fid50k                                  # GPU: standard + MoVE-x1, 50k, batch 256
    python -m benchmarks.fid50k --only standard:256:50000,move-x1:512:10000 --extract_workers 16
    python -m benchmarks.fid50k --parts eval --only standard:256:10000,standard:256:10000:compiled
    python -m benchmarks.fid50k --smoke                          # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from ._util import arm_config, device_name, json_line, median, print_table, release, sync

FEATURE_DIMS = {"mu": 2048, "mu_s": 17 * 17 * 7}  # pool features; sFID's mixed_6/conv[:7]
PHASES = ("setup", "ref_load", "sample", "capture", "decode", "inception", "ref_feats", "scoring")
PER_SAMPLE = ("sample", "decode", "inception")  # the phases that grow with num_samples


# --------------------------------------------------------------------------- inputs (random)


def tokenizer_config(smoke: bool):
    """LlamaGen's VQ-16 (256 x 256 -> 16 x 16, K = 16384); for ``smoke`` the same architecture
    at 32 x 32 -> 4 x 4, K = 64 (the tiny GPT's grid and vocabulary)."""
    from movegen.tokenizer import TokenizerConfig

    if smoke:
        return TokenizerConfig(architecture="llamagen-vq", image_size=32, channels=3, base_channels=8,
                               channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16, code_dim=4,
                               codebook_size=64)  # fmt: skip
    return TokenizerConfig.preset("llamagen-vq16")


def write_tokenizer(path: Path, smoke: bool) -> Path:
    """A ``tokenizer.ckpt`` of the VQ-16 architecture with its initial (random) weights and the
    dataset entry ``movegen convert llamagen-vq`` writes."""
    from movegen.checkpoint import atomic_torch_save, tokenizer_checkpoint
    from movegen.tokenizer import VQTokenizer

    cfg = tokenizer_config(smoke)
    torch.manual_seed(0)
    tok = VQTokenizer(cfg).eval()
    s = cfg.image_size
    info = {"name": "imagenet", "fit": "resize", "image_size": s, "native_size": s}
    atomic_torch_save(tokenizer_checkpoint(tok, dataset=info, metrics={}), path)
    return path


def write_model(path: Path, arm: str, tokenizer: Path, smoke: bool) -> Path:
    """A ``model.ckpt`` of the arm's GPT with random weights, its header naming ``tokenizer``
    as a code store's would (what ``evaluate`` loads and checks)."""
    from movegen.checkpoint import atomic_torch_save, model_checkpoint, sha256_file
    from movegen.model import GPT

    cfg = arm_config(arm, smoke)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # a non-degenerate head (it is zero at init)
        model.head.weight.normal_(std=0.02)
    header = {"codebook_size": cfg.vocab_size, "num_classes": cfg.num_classes, "h": cfg.grid_h,
              "w": cfg.grid_w, "dataset": "imagenet", "tokenizer_path": str(tokenizer.resolve()),
              "tokenizer_sha256": sha256_file(tokenizer)}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model_checkpoint(model, header=header, train={}, metrics={}), path)
    return path


def write_inception_weights(path: Path) -> Path:
    """A weights file in torch-fidelity's FID InceptionV3 layout with random values (He-normal
    convolutions, unit batch norms, a random classifier), as the tests build one."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as cls

    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    load, cls.load_state_dict = cls.load_state_dict, lambda self, *a, **k: None
    try:
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        cls.load_state_dict = load
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5
                )
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0), m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.zero_(), m.running_var.fill_(1.0)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02), m.bias.zero_()
    torch.save(net.state_dict(), path)
    return path


def write_reference(path: Path, n: int, size: int) -> Path:
    """An ADM-style reference batch: random ``mu``, ``sigma`` (2048), ``mu_s``, ``sigma_s``
    (17 x 17 x 7), symmetric positive definite (identity plus a random rank-64 part: cheap to
    make, and FID's eigenvalue problem costs the same for any dense matrix), and ``n`` random
    ``size`` x ``size`` uint8 images as ``arr_0``."""
    rng = np.random.default_rng(0)
    out = {}
    for key, d in FEATURE_DIMS.items():
        a = rng.standard_normal((d, 64)) / 8
        out[key], out[key.replace("mu", "sigma")] = rng.standard_normal(d), a @ a.T + np.eye(d)
    out["arr_0"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, **out)
    return path


def _jpeg(args) -> int:
    from PIL import Image

    path, w, h, seed = args
    rng = np.random.default_rng(seed)
    # smooth colour fields plus grain: file sizes and decoding work near natural photos'
    base = Image.fromarray(rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8))
    x = np.asarray(base.resize((w, h), Image.BICUBIC), dtype=np.int16)
    x = (x + rng.normal(0, 12, x.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(x).save(path, quality=90)
    return path.stat().st_size


def write_folder(root: Path, n: int, classes: int, size: tuple[int, int]) -> float:
    """``n`` JPEGs in ``classes`` class folders under ``root/train`` (an ImageFolder tree), sides
    drawn uniformly within +-20% of ``size`` (W, H); returns their mean size in KiB."""
    rng = np.random.default_rng(0)
    W, H = size
    jobs = []
    for c in range(classes):
        (root / "train" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(0.8 * W, 1.2 * W + 1)), int(rng.integers(0.8 * H, 1.2 * H + 1))
        jobs.append((root / "train" / f"n{i % classes:08d}" / f"{i:07d}.JPEG", w, h, i))
    with ThreadPoolExecutor(16) as pool:  # PIL encodes outside the GIL
        sizes = list(pool.map(_jpeg, jobs))
    return sum(sizes) / len(sizes) / 1024


# --------------------------------------------------------------------------- phases


class Phases:
    """Exclusive wall seconds per phase of wrapped calls: a wrapped call inside another counts
    for its own phase only. The device is synchronised at each boundary, so queued GPU work is
    charged to the phase that queued it."""

    def __init__(self, device: torch.device, progress_every: float = 30.0):
        self.device, self.seconds, self._inner = device, defaultdict(float), []
        # a line of the phases so far at most every progress_every seconds, so that a run cut
        # off by a time limit still leaves its rates (decoded images are counted as they come)
        self.decoded, self._every, self._printed = 0, progress_every, time.perf_counter()

    def wrap(self, fn, phase: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                dt = time.perf_counter() - t0
                self.seconds[phase] += dt - self._inner.pop()
                if self._inner:
                    self._inner[-1] += dt
                if time.perf_counter() - self._printed > self._every:
                    self._printed = time.perf_counter()
                    so_far = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
                    print(f"  so far: {so_far}; {self.decoded:,} images decoded", flush=True)

        return timed

    @contextlib.contextmanager
    def on_evaluate(self, overlap: bool = False):
        """Wrap what ``evaluate_model`` calls (names looked up in its module at call time).
        ``overlap``: ``generate_images`` decodes each batch on a second stream while it samples
        the next (``overlap=True``), and the decode is not timed apart (a synchronisation
        around it would undo the overlap): ``sample`` then holds the decode too. Otherwise the
        decode runs after each batch's sampling, as its own phase."""
        from movegen import evaluate, metrics
        from movegen.sample import CompiledStep

        load, compiled = evaluate.load_model_and_tokenizer, evaluate.CompiledDecode
        capture = self.wrap(CompiledStep._capture, "capture")

        def timed_decode(decode):  # counted, and timed unless overlapped
            def counted(*a, **k):
                images = decode(*a, **k)
                self.decoded += len(images)
                return images

            return counted if overlap else self.wrap(counted, "decode")

        def load_and_time_decode(*args, **kwargs):
            model, ckpt, tok, tck = load(*args, **kwargs)
            tok.decode = timed_decode(tok.decode)  # generate_images receives tok.decode
            return model, ckpt, tok, tck

        patches = {
            (evaluate, "load_model_and_tokenizer"): self.wrap(load_and_time_decode, "setup"),
            # compile_decoder: its compilation falls in the decode phase (the first call)
            (evaluate, "CompiledDecode"): lambda *a, **k: timed_decode(compiled(*a, **k)),
            (evaluate, "build_extractors"): self.wrap(evaluate.build_extractors, "setup"),
            (evaluate, "InceptionFeatures"): self.wrap(evaluate.InceptionFeatures, "setup"),
            (evaluate, "load_adm_reference"): self.wrap(evaluate.load_adm_reference, "ref_load"),
            (evaluate, "sha256_file_cached"): self.wrap(evaluate.sha256_file_cached, "ref_load"),
            (evaluate, "generate_images"): self.wrap(
                functools.partial(evaluate.generate_images, overlap=overlap), "sample"
            ),
            # (only a capture that happens: sample() asks before every batch, and a
            # synchronisation there would also stop an overlapped decode)
            (CompiledStep, "_capture"): lambda step, guided, counter: (
                None if (guided, counter) in step.graphs else capture(step, guided, counter)
            ),
            (evaluate, "extract_features"): self.wrap(evaluate.extract_features, "inception"),
            # reference_features (inside the ADM block) calls metrics' own name
            (metrics, "extract_features"): self.wrap(metrics.extract_features, "ref_feats"),
            (evaluate, "adm_reference_block"): self.wrap(evaluate.adm_reference_block, "scoring"),
            (evaluate, "inception_score"): self.wrap(evaluate.inception_score, "scoring"),
        }
        with contextlib.ExitStack() as stack:
            for (owner, name), fn in patches.items():
                stack.enter_context(mock.patch.object(owner, name, fn))
            yield self


# --------------------------------------------------------------------------- the two benchmarks


def evaluate_row(
    arm: str, batch: int, n: int, files: dict, work: Path, args, device, opts=frozenset()
) -> dict:
    from movegen.evaluate import evaluate_model
    from movegen.sample import SamplingSettings

    model = write_model(work / f"gpt-{arm}" / "model.ckpt", arm, files["tokenizer"], args.smoke)
    cache = Path(tempfile.mkdtemp(prefix="ref-cache-", dir=work))  # the reference uncached
    phases = Phases(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"arm": arm, "batch": batch, "num_samples": n,
           "ref_images": args.ref_images, "decode": "+".join(sorted(opts)) or "serial"}  # fmt: skip
    overlap = "overlap" in opts
    try:
        with phases.on_evaluate(overlap):
            t0 = time.perf_counter()
            r = evaluate_model(str(model), features="inception", num_samples=n, settings=SamplingSettings(cfg_scale=2.0),
                               seed=0, device=str(device), batch_size=batch, cache_dir=str(cache),
                               inception_weights=str(files["inception"]), reference=str(files["reference"]),
                               compile_decoder="compiled" in opts)  # fmt: skip
            sync(device)
            total = time.perf_counter() - t0
    except torch.OutOfMemoryError:  # (the phases timed until then stay in the row)
        r, total = None, "OOM"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    s = {p: phases.seconds.get(p, 0.0) for p in PHASES}
    row.update({f"{p}_s": v for p, v in s.items()}, total_s=total, host_peak_gib=_host_peak_gib())
    if device.type == "cuda":
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if r is None:
        return row
    row.update(other_s=total - sum(s.values()), evaluate_sample_seconds=r["sample_seconds"],
               **{k: r[k] for k in ("fid", "sfid", "is", "kid", "precision", "recall")})  # fmt: skip
    for p in PER_SAMPLE:
        row[f"{p}_images_per_s"] = n / s[p] if s[p] else float("nan")
    fixed = total - sum(s[p] for p in PER_SAMPLE)
    row["est_50k_min"] = (fixed + sum(s[p] for p in PER_SAMPLE) * 50_000 / n) / 60
    row["scores_finite"] = all(np.isfinite(row[k]) for k in ("fid", "sfid", "is"))
    return row


def _host_peak_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def extract_row(
    ten_crop: bool, workers: int, folder: Path, files: dict, work: Path, args, device
) -> dict:
    from movegen.cli import DataSource, extract_codes
    from movegen.data import CodeStore, collate_skip_none, load_dataset

    out = work / f"codes-{'tencrop' if ten_crop else 'plain'}-{workers}"
    sync(device)
    t0 = time.perf_counter()
    extract_codes(tokenizer=str(files["tokenizer"]), out=str(out), data=DataSource(name=f"folder:{folder}"),
                  views=2, ten_crop=ten_crop, batch_size=args.extract_batch, num_workers=workers,
                  device=device.type, overwrite=True)  # fmt: skip
    sync(device)
    wall = time.perf_counter() - t0
    store = CodeStore(out)
    n, views = store.codes.shape[:2]
    h, w = store.header["h"], store.header["w"]
    # the CPU side alone: the DataLoader extract_codes builds, one pass, nothing encoded
    size = tokenizer_config(args.smoke).image_size
    ds = load_dataset(f"folder:{folder}", "train", image_size=int(size * 1.1) if ten_crop else size)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.extract_batch, collate_fn=collate_skip_none,
                                         num_workers=workers)  # fmt: skip
    t0 = time.perf_counter()
    seen = sum(len(x) for x, _, _ in loader)
    load_s = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"views": "ten-crop" if ten_crop else "plain", "num_views": views, "workers": workers, "images": n,
            "grid": f"{h}x{w}", "wall_s": wall, "images_per_s": n / wall, "encodes_per_s": n * views / wall,
            "loader_images_per_s": seen / load_s, "encoder_images_per_s": files["encode_rate"] / views}  # fmt: skip


def encode_rate(tokenizer: Path, batch: int, device, iters: int) -> float:
    """Encodes per second of the tokenizer alone on random images, batch ``batch`` (the GPU side
    of an extraction)."""
    from movegen.checkpoint import load_tokenizer

    tok, _ = load_tokenizer(tokenizer, device)
    s = tok.config.image_size
    x = torch.rand(batch, 3, s, s, device=device) * 2 - 1
    tok.encode(x)  # warm-up (cuDNN's algorithm choice)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        tok.encode(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return batch / median(times)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models and sizes on the CPU, to check the script runs",
    )
    p.add_argument(
        "--parts",
        default="eval,extract",
        help="eval (the evaluation), extract (extraction), or both",
    )
    p.add_argument(
        "--arms", default="standard,move-x1", help="GPT-B arms evaluated (benchmarks._util.ARMS)"
    )
    p.add_argument(
        "--batches", default="256", help="sampling batch sizes (movegen evaluate --batch_size)"
    )
    p.add_argument(
        "--num_samples", type=int, default=50_000, help="images sampled and scored per evaluation"
    )
    p.add_argument(
        "--only",
        default="",
        help="comma list of arm:batch:num_samples[:OPTS] evaluations (instead of the grid); OPTS "
        "'overlap' (each batch decoded beside the next one's sampling, the decode then inside the "
        "sample phase; else decoded after it, timed apart), 'compiled' (evaluate "
        "--compile_decoder), or both as compiled+overlap",
    )
    p.add_argument(
        "--ref_images", type=int, default=10_000, help="arr_0 images of the written reference batch"
    )
    p.add_argument("--extract_images", type=int, default=5000, help="JPEGs in the synthetic folder")
    p.add_argument(
        "--extract_classes", type=int, default=1000, help="class folders they are spread over"
    )
    p.add_argument(
        "--extract_workers", default="8,16", help="--num_workers values of the extractions"
    )
    p.add_argument(
        "--extract_views", default="plain,ten-crop", help="plain (views 2) and/or ten-crop"
    )
    p.add_argument("--extract_batch", type=int, default=256, help="extract-codes --batch_size")
    p.add_argument(
        "--workdir",
        default=None,
        help="folder for the written inputs (default: a temporary one, removed)",
    )
    args = p.parse_args()
    parts = set(args.parts.split(","))
    try:
        if "eval" in parts:
            import torch_fidelity  # noqa: F401
    except ImportError:
        sys.exit("benchmarks.fid50k: the evaluation needs torch-fidelity (its FID InceptionV3), which is not "
                 "installed: pip install torch-fidelity (on the GPU machine: carry its wheel in .whl/ and "
                 "install it into /tmp/site), or run only the extraction with --parts extract")  # fmt: skip
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.num_samples, args.batches, args.ref_images = 8, "4", 8
        args.extract_images, args.extract_classes, args.extract_workers = 12, 3, "0"
        args.extract_batch = 8
    if args.only:
        grid = []
        for x in args.only.split(","):
            a, b, n, *mode = x.split(":")
            opts = set(mode[0].split("+")) if mode else set()
            if len(mode) > 1 or not opts <= {"overlap", "compiled"}:
                sys.exit(f"--only {x}: arm:batch:num_samples, then optionally :overlap, :compiled "
                         "or :compiled+overlap")  # fmt: skip
            grid.append((a, int(b), int(n), frozenset(opts)))
    else:
        grid = [
            (a, int(b), args.num_samples, frozenset())
            for b in args.batches.split(",")
            for a in args.arms.split(",")
        ]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fid50k-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = write_tokenizer(work / "vq16" / "tokenizer.ckpt", args.smoke)
        # the short part first: a long evaluation cut off by a time limit loses only itself
        if "extract" in parts:
            extract_part(tokenizer, work, args, device)
        if "eval" in parts:
            eval_part(grid, tokenizer, work, args, device)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _title(args, device) -> str:
    smoke = " (smoke: tiny models)" if args.smoke else ""
    return f"{device_name(device)}, torch {torch.__version__}{smoke}"


def extract_part(tokenizer: Path, work: Path, args, device) -> None:
    t0 = time.perf_counter()
    folder = work / "folder"
    side = (48, 42) if args.smoke else (400, 350)
    kib = write_folder(folder, args.extract_images, args.extract_classes, side)
    print(
        f"{args.extract_images} JPEGs (mean {kib:.0f} KiB) written in {time.perf_counter() - t0:.1f} s"
    )
    files = {"tokenizer": tokenizer,
             "encode_rate": encode_rate(tokenizer, args.extract_batch, device, 1 if args.smoke else 5)}  # fmt: skip
    rows = []
    for view in args.extract_views.split(","):
        for w in map(int, args.extract_workers.split(",")):
            rows.append(extract_row(view == "ten-crop", w, folder, files, work, args, device))
            print(rows[-1], flush=True)
            release(device)
    json_line("fid50k_extract", {"device": device_name(device), "torch": torch.__version__,
                                 "jpeg_kib": kib, "rows": rows})  # fmt: skip
    print_table(rows, [("views", "views", "{}"), ("num_views", "views/image", "{}"), ("workers", "workers", "{}"),
                       ("images", "images", "{:,}"), ("grid", "codes", "{}"), ("wall_s", "wall s", "{:.1f}"),
                       ("images_per_s", "images/s", "{:.0f}"), ("encodes_per_s", "encodes/s", "{:.0f}"),
                       ("loader_images_per_s", "loader alone img/s", "{:.0f}"),
                       ("encoder_images_per_s", "encoder alone img/s", "{:.0f}")],
                f"movegen extract-codes (VQ-16, batch {args.extract_batch}, {args.extract_images:,} JPEGs of "
                f"~{side[0]}x{side[1]}, {kib:.0f} KiB), {_title(args, device)}")  # fmt: skip


def eval_part(
    grid: list[tuple[str, int, int, frozenset]], tokenizer: Path, work: Path, args, device
) -> None:
    t0 = time.perf_counter()
    size = tokenizer_config(args.smoke).image_size
    files = {"tokenizer": tokenizer, "inception": write_inception_weights(work / "inception.pth"),
             "reference": write_reference(work / "reference.npz", args.ref_images, size)}  # fmt: skip
    print(f"inputs written in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for arm, b, n, opts in grid:
        rows.append(evaluate_row(arm, b, n, files, work, args, device, opts))
        print(rows[-1], flush=True)
        release(device)
    json_line(
        "fid50k_eval", {"device": device_name(device), "torch": torch.__version__, "rows": rows}
    )
    print_table(rows, [("arm", "arm", "{}"), ("batch", "batch", "{}"), ("num_samples", "samples", "{:,}"),
                       ("decode", "decode", "{}"), ("sample_s", "sample s", "{:.1f}"), ("sample_images_per_s", "sample img/s", "{:.0f}"),
                       ("capture_s", "capture s", "{:.1f}"),
                       ("decode_s", "decode s", "{:.1f}"), ("decode_images_per_s", "decode img/s", "{:.0f}"),
                       ("inception_s", "Inception s", "{:.1f}"), ("inception_images_per_s", "Inception img/s", "{:.0f}"),
                       ("ref_feats_s", "ref feats s", "{:.1f}"), ("scoring_s", "scoring s", "{:.1f}"),
                       ("ref_load_s", "ref load s", "{:.1f}"), ("setup_s", "setup s", "{:.1f}"),
                       ("other_s", "other s", "{:.1f}"), ("total_s", "total s", "{:.1f}"),
                       ("est_50k_min", "est. 50k min", "{:.1f}"), ("gpu_peak_gib", "GPU peak GiB", "{:.1f}"),
                       ("host_peak_gib", "host peak GiB", "{:.1f}")],
                f"movegen evaluate --reference (CFG 2.0, VQ-16 decode, FID/sFID/IS/KID/PR; reference "
                f"{args.ref_images:,} images, uncached), {_title(args, device)}")  # fmt: skip


if __name__ == "__main__":
    main()
