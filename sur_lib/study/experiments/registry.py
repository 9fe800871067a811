"""Every command of ``python -m sur_lib.study.experiments NAME``, in one table (``COMMANDS``).

One ``Experiment`` per NAME says where its code is and how the rest of the package treats it:

* ``module``: the module (a dotted path, imported only when needed, so that this table imports
  nothing and no module that reads it imports round a circle);
* the command line: ``config`` and ``runner`` (names in ``module``) for an experiment on the
  shared options of ``command.parse_args``, whose result ``command`` writes; without them the
  module has a ``main(argv)`` of its own (``--help``);
* ``verify``: the hook that re-checks its stored result, ``"module:function"`` with the one
  signature ``hook(doc, backbone, digest, draws, progress, out) -> list[check]`` (``doc`` the
  stored result, ``digest`` the loaded base model's UNet digest, ``draws`` the images to
  re-draw per condition, None for all, ``out`` the results folder); None for a command that
  writes no result (``verify`` itself, ``inputs``);
* ``keys`` (what ``verify`` reads from the result: a file without them is not this result),
  ``part`` (the verify process it runs in: ``verify.PARTS``), ``partial`` (it lands over
  sessions: verify checks ``NAME.partial.json`` until ``NAME.json`` exists) and
  ``prompt_sets`` (the prompt files it reads by name, which its result does not name: inputs
  of the result, ``inputs.input_files``).

``EXPERIMENTS`` (the results ``verify`` checks, in its order), ``command``'s choices and
``--help`` listing, ``verify``'s dispatch and ``inputs``' prompt sets are read from here.
(``claims`` names the results its table reads next to the code that reads them;
``tests/test_registry.py`` checks that each is registered.) Adding an experiment: its module
(runner, verify hook), an entry here, a test and a chapter.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

PACKAGE = "sur_lib.study.experiments"
IMAGES_HOOK = f"{PACKAGE}.checks:verify_images"  # a result that is only images: re-draw them
IMAGE_RESULT_KEYS = ("experiment", "model", "seed", "generation", "conditions")
EXTENDED_PROMPTS = "data/prompts/extended_heldout.json"  # world.extended_prompts' committed set


@dataclass(frozen=True)
class Experiment:
    name: str
    module: str
    about: str  # what it does, one paragraph (``--help``)
    config: str | None = None  # the config dataclass in ``module`` (the shared command line)
    runner: str | None = None  # the runner in ``module``: runner(config, backbone=None) -> result
    verify: str | None = IMAGES_HOOK  # "module:function", None: no result
    keys: tuple[str, ...] = IMAGE_RESULT_KEYS
    part: int = 1  # verify's process (0: the results that share the base model's draws)
    partial: bool = False
    prompt_sets: tuple[str, ...] = ()  # prompt files it reads by name: inputs of its result

    @property
    def own_command_line(self) -> bool:
        return self.config is None

    @property
    def result(self) -> bool:
        return self.verify is not None

    def config_class(self):
        return load(f"{self.module}:{self.config}")

    def run_function(self):
        return load(f"{self.module}:{self.runner}")

    def main_function(self):
        return load(f"{self.module}:main")

    def verify_hook(self):
        return load(self.verify)


def load(ref: str):
    """``"package.module:attribute"`` -> the attribute (the module imported now); a module
    path without ``:`` -> the module."""
    module, _, attr = ref.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def _m(name: str) -> str:
    return f"{PACKAGE}.{name}"


COMMANDS: dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        "failure", _m("failure"), config="FailureConfig", runner="run_failure", part=0,
        about="Table 1 analogue: the base model (``models.load_tiny_backbone()``) on each of the 45 "
              "held-out test prompts, with its simple text and with its complex counterpart, "
              "``--images`` (16) images per prompt, judged by ``evaluate.score`` (the prompt type's "
              "\"semantically correct\"); per-prompt accuracy with Wilson 95% intervals, per-type and "
              "overall averages, the paired difference complex - simple, and the judge's own accuracy "
              "(``data/results/judge.json``) next to the numbers."),
    Experiment(
        "sur", _m("sur"), config="SurConfig", runner="run_sur", part=0,
        about="build SURD-mini (``toyworld.build_dataset``), SmolLM2 knowledge vectors (a cached "
              "safetensors file), train the SUR-adapter with ``sur_lib.train.train`` on "
              "``sur_lib/configs/tiny.yaml`` (paper gradient path), store it in "
              "``data/models/sur-adapter-tiny/`` and compare it with the base model on the held-out "
              "simple prompts: per-type accuracy change with intervals, a paired test over prompts, "
              "image quality (BRISQUE and the clean-render distance) with t-tests as in the paper's "
              "Table 3, and the same comparison on fresh training-distribution prompts (train nouns "
              "and phrasings: the numbers to tune ``tiny.yaml`` on, never the test prompts)."),
    Experiment(
        "ablations", _m("ablations"), config="AblationsConfig", runner="run_ablations",
        verify=f"{_m('ablations')}:verify_ablations", part=0,
        keys=("experiment", "model", "seed", "variants", "surd_mini", "settings"),
        about="lambda1 = 0, lambda2 = 0, official vs paper gradient path, eta, the init of g (per-step "
              "loss logs: Fig. 6), the LLM layer (three depths of SmolLM2), the LLM size (SmolLM2 135M "
              "vs Gemma 3 270M) and the authors' batch_first bug, each a config override of the same "
              "training code, with a smaller budget than ``sur`` (stated in the JSON). Resumable: "
              "finished variants are kept in ``ablations.partial.json`` and skipped on the next run."),
    Experiment(
        "rewrite", _m("rewrite"), config="RewriteConfig", runner="run_rewrite", part=0,
        about="the baseline a user would pick instead: SmolLM2-135M-Instruct (chat template, greedy, "
              "few-shot examples made only of TRAIN nouns and phrasings) rewrites each simple test "
              "prompt into a keyword prompt, which the base model gets unchanged; same metrics as "
              "``sur``."),
    Experiment(
        "guidance", _m("guidance"), config="GuidanceConfig", runner="run_guidance",
        about="picks the classifier-free guidance scale on training-distribution prompts "
              "(pretraining-style complex prompts and SURD-mini-style simple prompts), never on test "
              "prompts."),
    Experiment(
        "compose", _m("compose"), config="ComposeConfig", runner="run_compose",
        verify=f"{_m('compose')}:verify_compose",
        about="the adapter composed with S-CFG and delayed conditioning, against plain CFG at the "
              "same scale (``compose``; ``python -m sur_lib.study.experiments.compose`` times S-CFG)."),
    Experiment(
        "probe", _m("probe"), verify=f"{_m('probe')}:verify_probe",
        keys=("experiment", "seed", "features", "prompts"),
        about="what the teacher knows: leave-one-noun-out linear probes of colour and shape from the "
              "knowledge vectors and the text encoder's states (``probe``; its own options)."),
    Experiment(
        "convergence", _m("convergence"), verify=f"{_m('convergence')}:verify_convergence", part=0,
        keys=("experiment", "model", "seed", "settings"), prompt_sets=(EXTENDED_PROMPTS,),
        about="``tiny.yaml`` trained to the paper's 5,000 steps, evaluated at log-spaced steps on the "
              "tuning set, the test prompts and the extended held-out set; resumable across sessions "
              "(``convergence``; its own options)."),
    Experiment(
        "tune", _m("tune"), verify=f"{_m('tune')}:verify_tune",
        keys=("experiment", "model", "seed", "settings"),
        about="ours, not the paper's: a seeded random search over the method's own knobs (steps, "
              "learning rate, eta, the lambdas, the KL temperature, SURD-mini's size) on the tuning set "
              "only; the choice is then evaluated once on the test and extended prompts beside the "
              "paper's settings (``tune``, built on ``recipes``; its own options)."),
    Experiment(
        "retest", _m("retest"), verify=f"{_m('retest')}:verify_retest",
        keys=("experiment", "model", "seed", "settings"),
        about="the loss-weight and teacher claims around a recipe: no teacher, no alignment, stronger "
              "lambdas chosen from the gradient shares, the authors' gradient path, Gemma, SmolLM2 "
              "without its attention sink, an oracle teacher; paired tests with Holm (``retest``; its "
              "own options)."),
    Experiment(
        "quality", _m("quality"), verify=f"{_m('quality')}:verify_quality",
        keys=("experiment", "model", "seed", "generation", "margin", "table", "records"),
        about="Table 3 at the plateau: the adapter's image quality against the base model's, paired "
              "over prompts, with an equivalence test (TOST) at a margin fixed in the code "
              "(``quality``; its own options)."),
    Experiment(
        "neighbours", _m("neighbours"), verify=f"{_m('neighbours')}:verify_neighbours", part=0,
        keys=("experiment", "k", "nouns", "tests"), prompt_sets=(EXTENDED_PROMPTS,),
        about="ours: transfer by neighbourhood in the text encoder's space: does a stored adapter help "
              "an unseen noun whose nearest training nouns share its class? Stored results only, no "
              "new images (``neighbours``; its own options)."),
    Experiment(
        "channel", _m("channel"), verify=f"{_m('channel')}:verify_channel", part=0, partial=True,
        keys=("settings", "variants", "base"),
        about="ours: the distillation channel, teachers given the same well-posed target (oracle, "
              "permuted oracle, SmolLM2, none) and text-only nouns that enter training only through "
              "L_LLM; resumable, two jobs side by side (``channel``; its own options)."),
    Experiment(
        "verify", _m("verify"), config="VerifyConfig", runner="run_verify", verify=None,
        about="re-checks every stored result: its records and summaries recomputed, a random subset "
              "of every condition's images re-drawn (the stored adapters are loaded, not retrained), "
              "the first training steps and the steps after stored adapters replayed, the input files' "
              "digests; exits non-zero if a number disagrees beyond the stated noise "
              "(``statistics.agreement``); see ``verify``'s docstring. Results without a JSON are "
              "skipped, with a message."),
    Experiment(
        "inputs", _m("inputs"), verify=None,
        about="not an experiment: records the SHA-256 of every committed file a stored result depends "
              "on (``inputs``; its own options)."),
)}

EXPERIMENTS: tuple[str, ...] = tuple(n for n, e in COMMANDS.items() if e.result)  # verify's order


def get(name: str) -> Experiment:
    return COMMANDS[name]


def listing(width: int = 94) -> str:
    """The commands and what each does, as ``--help`` prints them."""
    import textwrap

    out = []
    for e in COMMANDS.values():
        head = f"* ``{e.name}`` -- "
        out.append(textwrap.fill(e.about, width, initial_indent=head, subsequent_indent="  ",
                                 break_on_hyphens=False, break_long_words=False))
    return "\n".join(out)
