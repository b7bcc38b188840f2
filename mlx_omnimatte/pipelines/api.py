"""One request, one path: the command line and the Python API both resolve
the inputs, check the settings and the bundle, plan, and run through here.

    import mlx_omnimatte as mo
    layers = mo.decompose("clips/boys-beach", bundle="models/omnimatte-1.3b")
    layers["00"].alpha        # float32 [T, H, W] in [0, 1]
    bgs = mo.remove("clip.mp4", masks=["person.mp4"], bundle="models/casper-1.3b",
                    caption="a beach")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..branch.experts import KINDS
from ..bundle import COMPONENTS, Bundle, check_expert_fits, open_bundle
from ..compositing import as_float
from ..errors import OmnimatteError, article
from ..io.compose import FIT_MODES
from ..io.grid import GridVideo, plan_grid, resize_frames
from ..io.inputs import ClipSpec, read_clip, read_frames, resolve_clip
from ..io.video import IMAGE_EXTENSIONS, FrameStream, probe_video, read_video
from ..memory import machine_memory
from ..weights import read_config
from ..progress import Progress, Report
from ..prompts import prompt_cached
from .omnimatte import Layers, run_decompose
from .optimize import OptimizeSettings, check_optimize, fit_plate
from .cost import CostRequest, StageCost, long_run_advice, machine_rates, probes_for, render_costs, run_costs
from .plan import Outputs, RunPlan, check_fits, plan_plate, plan_run
from .removal import removal_targets, run_removal
from .settings import Mode, Settings, experts_needed, settings_from
from .two_stage import SOLVERS, run_two_stage, run_with_plate, solo_targets

REMOVE_TARGETS = ("all", "each", "both")
METHODS = ("experts", "two-stage")
METHOD_ALIASES = {"optimize": "two-stage"}  # the name before the fast solver: it no longer always optimizes


@dataclass
class Request:
    """What to run on which clip with which bundle."""

    mode: Mode
    clip: ClipSpec
    bundle: Path | None
    settings: Settings
    targets: str = "both"  # removal: all objects at once, each alone, or both
    optimize: OptimizeSettings = field(default_factory=OptimizeSettings)
    plate: Path | None = None  # clean-plate mode: the background, given
    fit: str | None = None  # how a plate of another size or length is fitted
    expert_dirs: dict = field(default_factory=dict)  # kind -> expert directory, over the bundle's
    outputs: Outputs = field(default_factory=Outputs)  # what will be written (planned: encoders, disk)
    solver: str = "fast"  # two-stage and clean plate: the layer solver (fast | unet)
    solo: bool = False  # two-stage: one removal trajectory per object as well

    @property
    def experts(self) -> tuple[str, ...]:
        return experts_needed(self.mode, self.settings.tau)


@dataclass
class Prepared:
    request: Request
    bundle: Bundle | None
    plan: RunPlan
    machine: int
    costs: list[StageCost] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.costs)

    def render(self) -> str:
        """The plan as `--dry-run` prints it: memory per stage, then time."""
        lines = [self.plan.render(self.machine), *render_costs(self.costs)]
        advice = long_run_advice(self.seconds, self.request.mode, self.request.solver, self.request.solo)
        return "\n".join(lines + ([advice] if advice else []))


def choose_mode(request: Request, method: str | None) -> Mode:
    """`decompose`'s method: the experts when the bundle has them, else the
    optimization; a clean plate needs no method. From the manifest alone."""
    if request.plate is not None:
        return Mode.PLATE
    if request.bundle is None:
        raise OmnimatteError("decompose: give --bundle (a converted model bundle) or --clean-plate PLATE")
    method = METHOD_ALIASES.get(method, method)
    if method not in (None, *METHODS):
        raise OmnimatteError(f"--method {method}: unknown (one of {', '.join(METHODS)})")
    have = {**open_bundle(request.bundle, ("transformer",)).experts, **request.expert_dirs}
    need = experts_needed(Mode.DECOMPOSE, request.settings.tau)
    if method == "experts" and not all(k in have for k in need):
        missing = ", ".join(k for k in need if k not in have)
        raise OmnimatteError(f"--method experts: the bundle {request.bundle} has no {missing} expert "
                             "(use --method two-stage, or add experts with `mlx-omnimatte convert`)")
    if method is None:
        method = "experts" if all(k in have for k in need) else "two-stage"
    return Mode.DECOMPOSE if method == "experts" else Mode.TWO_STAGE


def check_plate(path: Path, spec: ClipSpec, fit: str | None) -> None:
    """A plate of another size, or a video with fewer frames, is refused from
    its header alone unless `fit` says how to adapt it."""
    if not path.exists():
        raise OmnimatteError(f"{path}: no such clean plate")
    if fit is not None and fit not in FIT_MODES:
        raise OmnimatteError(f"--fit {fit}: unknown (one of {', '.join(FIT_MODES)})")
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        with Image.open(path) as im:
            w, h, t = im.size[0], im.size[1], 1
    else:
        info = probe_video(path, spec.info.fps)
        w, h, t = info.width, info.height, info.frames
    # the fitting rules on a shape-only stand-in (a broadcast view: no memory)
    if fit is None:
        fit_plate(np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (t, h, w, 3)), spec.info.frames,
                  spec.info.size, None)


def read_plate(path: Path, spec: ClipSpec, size: tuple[int, int], fit: str | None):
    """(the plate on the working grid, the background to write). An image is
    one frame; a video that needs no fitting is read onto the grid in one
    streaming pass and re-read frame by frame when written; only a plate
    that `--fit` reshapes is held at its own size."""
    n = spec.info.frames
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        with Image.open(path) as im:
            image = fit_plate(np.asarray(im.convert("RGB")), n, spec.info.size, fit)
        return resize_frames(image[:1], size, "area"), GridVideo(image, spec.info.size)
    if fit is None:
        return read_frames(path, n, size)[0], FrameStream(path, n)
    plate = fit_plate(read_video(path, fps=spec.info.fps)[0], n, spec.info.size, fit)
    return resize_frames(plate, size, "area"), GridVideo(plate, spec.info.size)


def with_experts(bundle: Bundle, expert_dirs: dict) -> Bundle:
    """The bundle with some experts replaced by other expert directories
    (`decompose --expert quality=DIR`, e.g. one just trained)."""
    if not expert_dirs:
        return bundle
    for kind, path in expert_dirs.items():
        if kind not in KINDS:
            raise OmnimatteError(f"--expert {kind}={path}: unknown kind (one of {', '.join(KINDS)})")
        if not Path(path).is_dir():
            raise OmnimatteError(f"--expert {kind}={path}: not an expert directory")
        given = read_config(Path(path)).get("kind") if (Path(path) / "config.json").is_file() else None
        if given not in (None, kind):
            raise OmnimatteError(f"--expert {kind}={path}: that is {article(given)} expert "
                                 f"(give it as {given}={path})")
    experts = {**bundle.manifest.get("experts", {}), **{k: str(Path(p).resolve()) for k, p in expert_dirs.items()}}
    return Bundle(bundle.root, {**bundle.manifest, "experts": experts})


def prepare(request: Request) -> Prepared:
    """Every check that needs no weights (bundle, experts' fit, plate), and the plan."""
    s, info = request.settings, request.clip.info
    if request.solver not in SOLVERS:
        raise OmnimatteError(f"layer solver {request.solver!r}: unknown (one of {', '.join(SOLVERS)})")
    if request.solver == "unet":
        check_optimize(request.optimize)
    if request.mode is Mode.PLATE:
        check_plate(request.plate, request.clip, request.fit)
        grid = plan_grid(info.width, info.height, info.frames, size=s.size, min_frames=1)
        plan = plan_plate(grid, request.clip.num_objects, request.solver, request.optimize, request.outputs)
        req = cost_request(request)
        costs = run_costs(req, grid, machine_rates(probes_for(req)))
        return Prepared(request, None, plan, machine_memory(), costs)
    b = with_experts(open_bundle(request.bundle, COMPONENTS), request.expert_dirs)
    transformer = read_config(b.path("transformer"))
    for kind in request.experts:
        check_expert_fits(b.expert(kind), transformer)
    grid = plan_grid(info.width, info.height, info.frames, size=s.size, min_frames=s.min_frames)
    cached = prompt_cached(b.path("t5"), request.clip.caption or "", s.cache_dir)
    plan = plan_run(request.mode, grid, request.clip.num_objects, b, s, cached, request.outputs,
                    trajectories(request))
    req = cost_request(request)
    costs = run_costs(req, grid, machine_rates(probes_for(req)), b, s, plan.windows, plan.tokens, cached)
    return Prepared(request, b, plan, machine_memory(), costs)


def trajectories(request: Request) -> int:
    """Denoising trajectories the run samples."""
    names, r = request.clip.names, request.targets
    if request.mode is Mode.REMOVE:
        return len(removal_targets(names, per_object=r != "all", all_objects=r != "each"))
    if request.mode is Mode.TWO_STAGE:
        return len(solo_targets(names)) if request.solo else 1
    return len(names)


def cost_request(request: Request) -> CostRequest:
    plate_video = request.plate is not None and not (request.plate.is_file()
                                                      and request.plate.suffix.lower() in IMAGE_EXTENSIONS)
    solver = request.solver if request.mode in (Mode.PLATE, Mode.TWO_STAGE) else "none"
    return CostRequest(request.mode, request.clip.num_objects, solver, request.optimize,
                       trajectories(request) if request.mode is not Mode.PLATE else 0, plate_video)


def check_plan(prepared: Prepared) -> None:
    """Refuse a run predicted not to fit this machine's memory."""
    check_fits(prepared.plan, prepared.machine, prepared.request.settings)


def grid_size(prepared: Prepared) -> tuple[int, int]:
    """The (W, H) the clip is read at: the model grid (or the working grid)."""
    return prepared.plan.grid.size


def execute(prepared: Prepared, report: Report = None) -> dict:
    """Check the plan fits, read the clip onto the model grid, run: removal ->
    {label: GridVideo}, the decompositions -> {name: LayerVideos}."""
    r = prepared.request
    check_plan(prepared)
    clip = read_clip(r.clip, grid_size(prepared), report)
    if r.mode is Mode.PLATE:
        working, background = read_plate(r.plate, r.clip, grid_size(prepared), r.fit)
        return run_with_plate(clip, working, background, r.optimize, report, r.solver)
    if r.mode is Mode.DECOMPOSE:
        return run_decompose(clip, prepared.bundle, r.settings, report, kinds=r.experts)
    if r.mode is Mode.TWO_STAGE:
        return run_two_stage(clip, prepared.bundle, r.settings, r.optimize, report, r.solver, r.solo)
    targets = removal_targets(clip.names, per_object=r.targets != "all", all_objects=r.targets != "each")
    return run_removal(clip, prepared.bundle, r.settings, report, targets)


def source_frames(spec: ClipSpec) -> np.ndarray:
    """The source video as one array (only the Python API returns whole arrays)."""
    return read_video(spec.video, fps=spec.fps, max_frames=spec.info.frames)[0]


def remove(video, masks=None, *, bundle, caption=None, frames=None, objects: str = "both",
           progress: bool = False, **settings) -> dict:
    """label ("all", "without_<name>") -> background float32 [T, H, W, 3] in [0, 1]."""
    request = Request(Mode.REMOVE, resolve_clip(video, masks or (), caption, frames), Path(bundle),
                      settings_from(**settings), objects)
    return {label: bg.full().astype(np.float32) / 255.0
            for label, bg in execute(prepare(request), Progress(enabled=progress)).items()}


def decompose(video, masks=None, *, bundle=None, caption=None, frames=None, method: str | None = None,
              experts: dict | None = None, clean_plate=None, fit: str | None = None,
              iterations: int | None = None, batch_frames: int | None = None, lr: float | None = None,
              layer_solver: str = "fast", solo: bool = False, progress: bool = False,
              **settings) -> dict[str, Layers]:
    """object name -> Layers(alpha, foreground, background), on the source grid.
    `method`: "experts" or "two-stage" (alias "optimize"; default: experts
    when the bundle has them); `experts`: {kind: expert directory} over the
    bundle's; `clean_plate`: a background video or image, then no bundle is
    needed; `layer_solver`: "fast" or "unet" (two-stage and clean plate);
    `solo`: two-stage with one removal pass per object as well."""
    opt = OptimizeSettings(**{k: v for k, v in (("batch_frames", batch_frames), ("lr", lr)) if v is not None})
    opt = opt.scaled(iterations) if iterations is not None else opt  # the schedule scales with the run
    request = Request(Mode.DECOMPOSE, resolve_clip(video, masks or (), caption, frames),
                      Path(bundle) if bundle is not None else None, settings_from(**settings), optimize=opt,
                      plate=Path(clean_plate) if clean_plate is not None else None, fit=fit,
                      expert_dirs={k: Path(v) for k, v in (experts or {}).items()}, solver=layer_solver,
                      solo=solo)
    request.mode = choose_mode(request, method)
    layers = execute(prepare(request), Progress(enabled=progress))
    source = as_float(source_frames(request.clip))
    return {name: layer.materialize(source) for name, layer in layers.items()}
