"""One request, one path: the command line and the Python API both resolve
the inputs, check the settings and the bundle, plan, and run through here.

    import mlx_omnimatte as mo
    layers = mo.decompose("clips/boys-beach", bundle="models/omnimatte-1.3b")
    layers["00"].alpha        # float32 [T, H, W] in [0, 1]
    bgs = mo.remove("clip.mp4", masks=["person.mp4"], bundle="models/casper-1.3b",
                    caption="a beach")
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..branch.experts import KINDS
from ..bundle import Bundle, open_bundle
from ..compositing import as_float
from ..encoders.text import prompt_cached
from ..errors import OmnimatteError, article
from ..io.compose import FIT_MODES, check_size, fit_times
from ..io.grid import GridVideo, plan_grid, resize_frames
from ..io.inputs import Clip, ClipSpec, read_clip, read_frames, resolve_clip
from ..io.video import IMAGE_EXTENSIONS, FrameStream, probe_video, read_video
from ..memory import machine_memory
from ..progress import Progress, Report
from ..step_cache import expected_forwards, parse_cache
from ..weights import BUNDLE_COMPONENTS, read_config
from .omnimatte import Layers, run_decompose
from .optimize import AGAINST, PLATE, OptimizeSettings, check_optimize, fit_plate
from .cost import CostRequest, StageCost, long_run_advice, machine_rates, probes_for, render_costs, run_costs
from .plan import Outputs, RunPlan, check_fits, plan_plate, plan_run
from .removal import removal_targets, run_removal
from .conditioning import remover_prompt
from .settings import Mode, Settings, apply_remover, experts_needed, settings_from
from .stages import bundle_calibration
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
    opened: Bundle | None = field(default=None, repr=False)  # the bundle, once opened (carried, not reopened)

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
    cache: str = ""  # the step cache's expected forwards, a line for the plan and the run's header
    notes: list[str] = field(default_factory=list)  # one-line notices (a calibration ignored)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.costs)

    def render(self) -> str:
        """The plan as `--dry-run` prints it: memory per stage, the step
        cache's expected forwards, then time."""
        lines = [self.plan.render(self.machine), *([self.cache] if self.cache else []), *render_costs(self.costs)]
        advice = long_run_advice(self.seconds, self.request.mode, self.request.solver, self.request.solo)
        return "\n".join(lines + ([advice] if advice else []))


def choose_mode(plate, bundle, method: str | None, expert_dirs: dict, tau) -> tuple[Mode, Bundle | None]:
    """`decompose`'s method and its opened bundle: the experts when the
    bundle has them, else two-stage; a clean plate needs no method. From the
    manifest alone."""
    if plate is not None:
        return Mode.PLATE, None
    if bundle is None:
        raise OmnimatteError("decompose: give --bundle (a converted model bundle) or --clean-plate PLATE")
    method = METHOD_ALIASES.get(method, method)
    if method not in (None, *METHODS):
        raise OmnimatteError(f"--method {method}: unknown (one of {', '.join(METHODS)})")
    opened = open_bundle(bundle, ("transformer",))
    have = {**opened.experts, **expert_dirs}
    need = experts_needed(Mode.EXPERTS, tau)
    if method == "experts" and not all(k in have for k in need):
        missing = ", ".join(k for k in need if k not in have)
        raise OmnimatteError(f"--method experts: the bundle {bundle} has no {missing} expert "
                             "(use --method two-stage, or add experts with `mlx-omnimatte convert`)")
    if method is None:
        method = "experts" if all(k in have for k in need) else "two-stage"
    return (Mode.EXPERTS if method == "experts" else Mode.TWO_STAGE), opened


def optimize_settings(iterations: int | None = None, batch_frames: int | None = None,
                      lr: float | None = None) -> OptimizeSettings:
    """The U-Net settings (None: the default); the reference's step schedule
    (lr drops, end of mask supervision) scales with the iterations."""
    opt = OptimizeSettings(**{k: v for k, v in (("batch_frames", batch_frames), ("lr", lr)) if v is not None})
    return opt.scaled(iterations) if iterations is not None else opt


def remove_request(video, masks=(), *, bundle, caption=None, frames=None, objects: str = "both",
                   outputs: Outputs | None = None, **settings) -> Request:
    """The one `remove` request of the command line and the Python API."""
    return Request(Mode.REMOVE, resolve_clip(video, masks, caption, frames), Path(bundle), settings_from(**settings),
                   objects, outputs=outputs or Outputs())


def decompose_request(video, masks=(), *, bundle=None, caption=None, frames=None, method: str | None = None,
                      experts: dict | None = None, clean_plate=None, fit: str | None = None,
                      iterations: int | None = None, batch_frames: int | None = None, lr: float | None = None,
                      layer_solver: str = "fast", solo: bool = False, outputs: Outputs | None = None,
                      **settings) -> Request:
    """The one `decompose` request of the command line and the Python API,
    its method chosen (and its bundle opened, once)."""
    clip = resolve_clip(video, masks, caption, frames)
    s = settings_from(**settings)
    plate = Path(clean_plate) if clean_plate is not None else None
    bundle = Path(bundle) if bundle is not None else None
    expert_dirs = {k: Path(v) for k, v in (experts or {}).items()}
    mode, opened = choose_mode(plate, bundle, method, expert_dirs, s.tau)
    return Request(mode, clip, bundle, s, optimize=optimize_settings(iterations, batch_frames, lr), plate=plate,
                   fit=fit, expert_dirs=expert_dirs, outputs=outputs or Outputs(), solver=layer_solver, solo=solo,
                   opened=opened)


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
    # the fitting rules of `fit_plate`, on the header's figures
    check_size((w, h), spec.info.size, fit, PLATE, AGAINST)
    fit_times(t, spec.info.frames, fit, PLATE, AGAINST)


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
    return replace(bundle, manifest={**bundle.manifest, "experts": experts})


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
    opened = request.opened or open_bundle(request.bundle, ())
    b = with_experts(opened.check(BUNDLE_COMPONENTS), request.expert_dirs)
    apply_remover(s, b.remover)  # its sampler and steps where the caller set none
    if request.experts and b.remover.prompt == "none":
        raise OmnimatteError(f"{request.bundle}: {b.remover.name} has no cross-attention, which the experts' "
                             "LoRA targets; use --method two-stage")
    b.check((), request.experts)
    grid = plan_grid(info.width, info.height, info.frames, size=s.size, min_frames=s.min_frames)
    prompt = remover_prompt(b.remover, request.clip.caption)
    cached = prompt is None or prompt_cached(b.path("t5"), prompt, s.cache_dir)
    plan = plan_run(request.mode, grid, request.clip.num_objects, b, s, cached, request.outputs,
                    trajectories(request))
    calibration, note = bundle_calibration(b, s)  # a broken calibration is refused here, before any weight
    spec = parse_cache(s.cache)
    expect = expected_forwards(spec, s.steps, calibration, s.sampler, s.shift)
    req = cost_request(request)
    costs = run_costs(req, grid, machine_rates(probes_for(req)), b, s, plan.windows, plan.tokens, cached,
                      expect.computed / expect.steps)
    return Prepared(request, b, plan, machine_memory(), costs, expect.line(spec) if spec.enabled else "",
                    [note] if note else [])


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


def read_input(prepared: Prepared, report: Report = None) -> Clip:
    """The clip read onto the planned grid, which it carries to the stages."""
    return replace(read_clip(prepared.request.clip, grid_size(prepared), report), plan=prepared.plan.grid)


def execute(prepared: Prepared, report: Report = None) -> dict:
    """Check the plan fits, read the clip onto the model grid, run: removal ->
    {label: GridVideo}, the decompositions -> {name: LayerVideos}."""
    r = prepared.request
    check_plan(prepared)
    clip = read_input(prepared, report)
    if r.mode is Mode.PLATE:
        working, background = read_plate(r.plate, r.clip, grid_size(prepared), r.fit)
        return run_with_plate(clip, working, background, r.optimize, report, r.solver)
    if r.mode is Mode.EXPERTS:
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
    request = remove_request(video, masks or (), bundle=bundle, caption=caption, frames=frames, objects=objects,
                             **settings)
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
    request = decompose_request(video, masks or (), bundle=bundle, caption=caption, frames=frames, method=method,
                                experts=experts, clean_plate=clean_plate, fit=fit, iterations=iterations,
                                batch_frames=batch_frames, lr=lr, layer_solver=layer_solver, solo=solo, **settings)
    layers = execute(prepare(request), Progress(enabled=progress))
    source = as_float(source_frames(request.clip))
    return {name: layer.materialize(source) for name, layer in layers.items()}
