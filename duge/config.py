"""Every setting of an unlearning run, in one torch-free place: `UnlearnConfig`, `METHODS`, `SETTINGS`, `TRAINABLE`.

The command line (`duge.cli`) and the DUGE Unlearn node fill an `UnlearnConfig`; each field's
`metadata["help"]` is the one description of the setting, and its group (`GROUPS`) says which
part of the run it belongs to. Nothing here imports torch, so the CLI and ComfyUI read the
defaults without loading a model library.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import DugeError
from .methods import METHODS, get_method

SETTINGS = ("sequential", "independent", "simultaneous")
TRAINABLE = ("kv", "qkv", "attn2")  # the cross-attention projections edited (patterns: duge.edits)
TRAINABLE_MODES = ("full", "lora")
# Against erosion (duge.objective.regularization): l2sp / fisher pull the total delta towards θ0 (F = 1 or a
# diagonal Fisher); penalty / projection protect the K/V outputs of the text states that must stay
# (duge.preservation): a penalty tr(ΔW C ΔWᵀ) on the request's delta, or each update projected onto C's
# soft null space; none: nothing.
REGULARIZERS = ("l2sp", "fisher", "penalty", "projection", "none")
DTYPES = ("auto", "float32", "float16", "bfloat16")
EVAL_MODES = ("auto", "each", "final", "none")  # when a run measures UA/IRA/CRA (duge.run.measuring_mode)
# What adversarial training attacks its edit with (duge.adversarial): the prompt search's text prefixes, or the
# concept inversion's learnt embedding of the target's name.
ADVERSARIAL_ATTACKS = ("prompt", "inversion")

# Seeds derived from `UnlearnConfig.seed` (or a request's own seed), one offset per use, so that no
# two uses draw the same random numbers.
FISHER_SEED_OFFSET = 7  # images for the Fisher estimate
EVALUATION_SEED_OFFSET = 999  # the images a run is measured on
REQUEST_SEED_STRIDE = 100  # request k: seed + 100·k
RELATED_IMAGES_SEED_OFFSET = 10_000  # a request's related-concept images: its seed + 10 000
TARGET_IMAGES_SEED_OFFSET = 20_000  # a request's target images (esd-x): its seed + 20 000
TEACHER_POOL_SEED_OFFSET = 30_000  # a request's teacher pool rows (duge.teachers): its seed + 30 000
ADVERSARIAL_SEED_OFFSET = 40_000  # a request's attack-search images and draws (duge.adversarial): its seed + 40 000

__all__ = ["UnlearnConfig", "METHODS", "SETTINGS", "TRAINABLE", "GROUPS", "request_seed", "AttackConfig", "method_config"]


def _setting(default, help: str, group: str, choices=None, **kwargs):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices}, **kwargs)


@dataclass
class UnlearnConfig:
    """Every setting of a run (module doc). Defaults are DUGE's; field names are the CLI's flags in kebab-case."""

    # ---- what is trained, and how
    method: str = _setting("duge", "DUGE, or a baseline through the same trainer: Concept Ablation (ca), fine-tuning "
                           "with L2-SP (ft-l2sp), ESD on cross-attention (esd-x), or UCE's closed form (uce; not in ComfyUI)",
                           "run", choices=tuple(METHODS))
    setting: str = _setting("sequential", "sequential: each request from the last result; independent: each from the "
                            "original model, merged at the end; simultaneous: all requests in one optimisation",
                            "run", choices=SETTINGS)
    # 75 steps at 4e-3 ended the never-reported method_tuning10 at least as well as 150 at 2e-3 on two seeds
    # (H 0.962/0.953 against 0.955/0.930) in half the steps (docs/method.md, "Half the steps")
    steps: int = _setting(75, "optimisation steps per request (a request's own steps, if the concept set gives "
                          "them, override it)", "run")
    learning_rate: float = _setting(4e-3, "AdamW's learning rate", "run")
    batch_size: int = _setting(8, "anchor samples per step", "run")
    related_batch_size: int | None = _setting(None, "related-concept samples of the prior term per step (DUGE; None: "
                                              "as many as batch_size, or one per anchor and replayed sample when the "
                                              "teachers run every step)", "run")
    # Sequential setting: samples replaying the cross-attention loss of earlier requests (their cached
    # anchor images), added to each step's batch, so that a later request — and the regulariser's pull
    # towards θ0 — cannot undo an earlier erasure. 0 turns replay off.
    # The earlier requests share these rows in a cycle (duge.batches.replay_requests): each gets the same
    # number of rows over the sequence.
    replay_batch_size: int = _setting(4, "samples per step replaying earlier requests (sequential setting; 0: off)",
                                      "run")
    # DUGE (duge.teachers): the teachers' outputs on a pool of rows per request, computed once when the request
    # starts; a replayed row keeps its own request's targets; related concepts never erased are taught by θ0.
    # Default 128 with the penalty below: on method_tuning10 (ten requests, never reported) UA 0.933 against the
    # per-step teachers with L2-SP's 0.825, the same retention, 0.68x the seconds per request (docs/method.md).
    teacher_pool: int = _setting(128, "rows per request whose frozen teachers' outputs are computed once when the "
                                 "request starts (DUGE); each step draws its rows from the pools and runs only the "
                                 "trainable pass. 0: the teachers run at every step", "run")
    trainable: str = _setting("kv", "cross-attention projections edited: K/V, Q/K/V, or all of attn2", "run",
                              choices=TRAINABLE)
    trainable_mode: str = _setting("full", "train full deltas, or low-rank (LoRA) deltas", "run",
                                   choices=TRAINABLE_MODES)
    trainable_rank: int = _setting(4, "rank of the trained deltas when trainable_mode is lora", "run")
    attention_layers: list[str] | None = _setting(None, "cross-attention layers whose maps the attention term "
                                                  "compares (None: every one)", "run")
    dtype: str = _setting("auto", "compute dtype (autocast; the deltas stay float32)", "run", choices=DTYPES)
    seed: int = _setting(0, "seed of the images, noise and batches (request k uses seed + 100·k)", "run")

    # ---- loss weights: L = L_out + β·L_attn + λ_prior·L_prior + λ_reg·L_reg
    beta: float = _setting(10.0, "weight of the attention-map term (target words must look where the anchor's do)",
                           "loss weights")
    lambda_prior: float = _setting(1.0, "weight of the prior-preservation loss on the related concepts",
                                   "loss weights")
    lambda_reg: float = _setting(2e-5, "weight of the regulariser towards the original weights (against erosion); it "
                                 "sums over every edited weight, so useful values are small; lower erases two or three concepts more "
                                 "strongly, higher keeps long sequences from eroding (see the README)", "loss weights")
    regularizer: str = _setting("penalty", "against erosion: l2sp (towards the original weights, F = 1), fisher (F a "
                                "diagonal Fisher on general prompts), penalty (λ_reg·tr(ΔW C ΔWᵀ): the request's edit "
                                "may not move the K/V outputs of the text states that must stay), projection (each "
                                "update projected onto the soft null space of those states, projection_mu), none",
                                "loss weights", choices=REGULARIZERS)
    projection_mu: float = _setting(0.1, "regularizer projection: an update keeps μ/(λ+μ) of its component along an "
                                    "input direction of energy λ (relative to the mean; 0: none of it, the hard null "
                                    "space)", "loss weights")
    fisher_samples: int = _setting(8, "prompts the Fisher estimate averages over", "loss weights")
    # DUGE's output-term target guided away from the target prompt by this much (0: the anchor's
    # prediction alone, as in the design doc): ε_φ(anchor) − η_a·(ε_θ0(target) − ε_θ0(anchor)).
    anchor_guidance: float = _setting(0.5, "also steer the target away from itself (along the original model's "
                                      "target-minus-anchor direction), not only towards the anchor; 0: off",
                                      "loss weights")

    # ---- output-space erasure (duge.output_erasure; DUGE only): after a request trains, the output directions of each
    # K/V projection that carry its target are removed for every input, so that no prompt or learnt embedding reaches them
    output_erasure_rank: int = _setting(0, "output directions per request removed from every K/V projection after it "
                                        "trains (its target minus its anchor, against what must stay): no prompt, "
                                        "an inverted embedding included, reaches them again; 0: off (DUGE method only)",
                                        "erasure")
    output_erasure_epsilon: float = _setting(0.1, "how strictly those directions avoid the outputs that must stay: "
                                             "the directions maximise the target-minus-anchor output energy over the "
                                             "protected outputs' energy plus ε (each of trace 1); smaller ε, more "
                                             "specific directions", "erasure")

    # ---- adversarial training (duge.adversarial; DUGE only): the trainer attacks its own edit at intervals, as
    # AdvUnlearn and Receler do, and trains the erasure on the attack prompts it found
    adversarial_every: int = _setting(0, "every N steps of a request (from step N on), attack the current edit "
                                      "(adversarial_attack) and train every other row of the request on its target "
                                      "prompt as the attack changed it; 0: off (DUGE method only)", "adversarial")
    adversarial_attack: str = _setting("prompt", "what those attacks are: prompt: duge attack's prompt search, the "
                                       "tokens found put before the target prompt; inversion: duge attack's concept "
                                       "inversion, the target's name replaced by the learnt token embedding",
                                       "adversarial", choices=ADVERSARIAL_ATTACKS)
    adversarial_budget: int = _setting(1000, "UNet passes of one latent each of those searches may spend (a backward "
                                       "pass counts as 2)", "adversarial")
    adversarial_prompts: int = _setting(2, "how many of the request's latest attack prompts (or embeddings) are "
                                        "trained on", "adversarial")

    # ---- the images the frozen model generates for each request before training
    anchor_images: int = _setting(16, "images generated per request from the anchor prompts", "images")
    related_images: int = _setting(4, "images generated per related concept to preserve", "images")
    sampler_steps: int = _setting(20, "sampler steps for the images generated per request", "images")
    sampler_guidance: float = _setting(7.5, "classifier-free guidance for those images", "images")
    image_cache_dir: str | None = _setting(None, "keep each request's generated images in this folder and reuse them in "
                                     "later runs (None: in memory only)", "images")

    # ---- memory (duge.memory.choose_memory_settings): "auto" is settled at the start of the run against
    # the device's free memory (or memory_budget_gb): micro-batches first (no extra compute), gradient
    # checkpointing only when one row alone would not fit. The choice is logged.
    gradient_checkpointing: bool | str = _setting("auto", "recompute UNet blocks in the backward pass instead of "
                                                  "keeping their activations (auto: only when one batch row would "
                                                  "not fit)", "memory")
    micro_batch_size: int | str = _setting("auto", "batch rows per UNet pass, gradients accumulated (the same step; "
                                           "auto: as many as fit, 0: the whole batch)", "memory")
    memory_budget_gb: float | None = _setting(None, "memory the training may add over the loaded model, in GiB "
                                              "(2^30 bytes); unset: the device's free memory when the run starts",
                                              "memory")

    # ---- measuring (duge.run): the unedited model first, then after each request or after the last
    eval: str = _setting("auto", "measure UA/IRA/CRA after each request, only after the last (and the unedited "
                         "model before), or not at all; auto: each on the built-in model or with a classifier, "
                         "none otherwise", "measuring", choices=EVAL_MODES)
    eval_steps: int = _setting(10, "sampler steps of each image a measurement draws (the benchmarks' figures are "
                               "measured at 10 too)", "measuring")

    # ---- the baselines' own settings
    esd_eta: float = _setting(1.0, "negative-guidance strength of the esd-x baseline", "baselines")
    # The uce baseline's closed form (duge.uce): λ, erase and preserve scales of the authors' script.
    uce_lambda: float = _setting(0.5, "λ of UCE's closed form (keeps unnamed directions)", "baselines")
    uce_erase_scale: float = _setting(1.0, "erase scale of UCE's closed form", "baselines")
    uce_preserve_scale: float = _setting(1.0, "preserve scale of UCE's closed form", "baselines")

    @property
    def related_rows(self) -> int:
        """Related-concept rows of the prior term per step: `related_batch_size`, or `batch_size` if unset."""
        return self.batch_size if self.related_batch_size is None else self.related_batch_size

    def validate(self) -> None:
        for name, allowed in (("setting", SETTINGS), ("trainable", TRAINABLE), ("trainable_mode", TRAINABLE_MODES),
                              ("regularizer", REGULARIZERS), ("dtype", DTYPES), ("eval", EVAL_MODES)):
            if getattr(self, name) not in allowed:
                raise DugeError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.teacher_pool < 0:
            raise DugeError(f"teacher_pool must be 0 (teachers at every step) or a number of rows, got {self.teacher_pool}")
        for name in ("steps", "batch_size", "anchor_images", "eval_steps"):
            if getattr(self, name) < 1:
                raise DugeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.projection_mu < 0:
            raise DugeError(f"projection_mu must be 0 (the hard null space) or more, got {self.projection_mu}")
        if self.related_batch_size is not None and (isinstance(self.related_batch_size, bool)
                                                    or not isinstance(self.related_batch_size, int)
                                                    or self.related_batch_size < 1):
            raise DugeError(f"related_batch_size must be None (as many as batch_size) or a number of rows of at least 1, "
                            f"got {self.related_batch_size!r}")
        if self.replay_batch_size < 0:
            raise DugeError(f"replay_batch_size must be 0 (no replay) or more, got {self.replay_batch_size}")
        if self.anchor_guidance < 0:
            raise DugeError(f"anchor_guidance must be 0 or more, got {self.anchor_guidance}")
        if self.learning_rate <= 0:
            raise DugeError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise DugeError(f"gradient_checkpointing must be true, false or 'auto', got {self.gradient_checkpointing!r}")
        if self.micro_batch_size != "auto" and (isinstance(self.micro_batch_size, bool)
                                                or not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 0):
            raise DugeError(f"micro_batch_size must be 'auto', 0 (the whole batch) or a positive number of rows, "
                            f"got {self.micro_batch_size!r}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise DugeError(f"memory_budget_gb must be positive or None, got {self.memory_budget_gb!r}")
        get_method(self.method)
        self._validate_adversarial()
        if isinstance(self.output_erasure_rank, bool) or not isinstance(self.output_erasure_rank, int) \
                or self.output_erasure_rank < 0:
            raise DugeError(f"output_erasure_rank must be a whole number of at least 0, got {self.output_erasure_rank!r}")
        if not self.output_erasure_epsilon > 0:
            raise DugeError(f"output_erasure_epsilon must be positive, got {self.output_erasure_epsilon}")
        if self.output_erasure_rank and self.method != "duge":
            raise DugeError(f"output_erasure_rank is a setting of the DUGE method; method {self.method!r} trains "
                            "without it (set output_erasure_rank to 0)")

    def _validate_adversarial(self) -> None:
        for name, least in (("adversarial_every", 0), ("adversarial_budget", 1), ("adversarial_prompts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DugeError(f"{name} must be a whole number of at least {least}, got {value!r}")
        if self.adversarial_attack not in ADVERSARIAL_ATTACKS:
            raise DugeError(f"adversarial_attack must be one of {', '.join(ADVERSARIAL_ATTACKS)}, "
                            f"got {self.adversarial_attack!r}")
        if self.adversarial_every and self.method != "duge":
            raise DugeError(f"adversarial_every is a setting of the DUGE method; method {self.method!r} trains "
                            "without it (set adversarial_every to 0)")
        if self.adversarial_every and self.setting == "simultaneous":
            raise DugeError("adversarial_every attacks one request's edit at a time; the simultaneous setting "
                            "trains every request at once (use sequential or independent, or adversarial_every 0)")


GROUPS = {f.name: f.metadata["group"] for f in fields(UnlearnConfig)}
HELP = {f.name: f.metadata["help"] for f in fields(UnlearnConfig)}



def node_tooltip(name: str) -> str:
    """A field's help as a ComfyUI tooltip, one sentence (the DUGE Unlearn node's inputs use these)."""
    text = HELP[name]
    return text[0].upper() + text[1:] + "."


def request_seed(config: UnlearnConfig, k: int, own_seed: int | None = None) -> int:
    """The seed of request k: its own seed if the concept set gives one, else `config.seed + 100·k`."""
    return own_seed if own_seed is not None else config.seed + REQUEST_SEED_STRIDE * k

# ---------------------------------------------------------------- attacks on an edited model (duge.attacks)

ATTACKS = ("prompt", "inversion", "both")
SEARCHES = ("auto", "greedy", "gradient")
POSITIONS = ("prefix", "insert")
BACKWARD_COST = 2  # a backward pass through the UNet counted as two forward passes (the usual FLOP estimate)


def _attack_setting(default, help: str, choices=None):
    return _setting(default, help, "attack", choices=choices)


@dataclass
class AttackConfig:
    """How hard each attack tries and how its result is judged (module doc of `duge.attacks`). `duge attack`,
    `duge unlearn --attack` and the benchmarks fill one; the same budget and seeds for every model attacked."""

    attack: str = _attack_setting("both", "which attacks to run: the prompt search, the concept inversion, or both",
                                  choices=ATTACKS)
    budget: int = _attack_setting(4000, "edited-UNet passes of one latent each attack may spend per concept (a backward "
                                  f"pass counts as {BACKWARD_COST}); the same for every model attacked")
    search: str = _attack_setting("auto", "prompt search: greedy coordinate search over the whole vocabulary, or the "
                                  "gradient-guided search (one-hot gradients, GCG); auto: greedy for vocabularies of at "
                                  "most greedy_vocabulary_limit tokens", choices=SEARCHES)
    tokens: int = _attack_setting(5, "prompt search: attack tokens added to the prompt")
    position: str = _attack_setting("prefix", "prompt search: attack tokens before the prompt, or spread between its words",
                                    choices=POSITIONS)
    greedy_vocabulary_limit: int = _attack_setting(1024, "search=auto: the largest vocabulary searched greedily")
    top_k: int = _attack_setting(16, "gradient search: tokens per position taken from the gradient's most promising")
    candidates: int = _attack_setting(32, "gradient search: single-token swaps evaluated per step")
    # 2e-2, not textual inversion's usual 5e-3: the budget allows ~160 Adam steps, and at 5e-3 the token on the
    # never-edited model learnt the objective images' colour instead of a style ("striped": 7 of 16 images).
    inversion_learning_rate: float = _attack_setting(2e-2, "concept inversion: Adam's learning rate for the token embedding")
    inversion_batch: int = _attack_setting(8, "concept inversion: noisy latents per gradient step")
    initializer: str = _attack_setting("", "concept inversion: the word whose embedding the new token starts from "
                                       "('': the mean embedding of the vocabulary)")
    objective_images: int = _attack_setting(4, "images of the target the unedited model draws for the attack's objective")
    objective_timesteps: int = _attack_setting(2, "noise levels per objective image (fixed draws, stratified over the "
                                               "schedule)")
    eval_images: int = _attack_setting(16, "images the attacked model draws from the attack's result for the judgement, "
                                       "from held-out seeds")
    sample_steps: int = _attack_setting(20, "sampler steps of every image drawn")
    guidance: float = _attack_setting(7.5, "classifier-free guidance of every image drawn")
    seed: int = _attack_setting(0, "seed of the objective's images (seed, seed+1, ...), noise and the search's choices")
    eval_seed: int = _attack_setting(100_000, "first seed of the judgement's images (held out from the objective's)")

    def validate(self) -> None:
        for name, allowed in (("attack", ATTACKS), ("search", SEARCHES), ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise DugeError(f"attack setting {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("budget", "tokens", "top_k", "candidates", "inversion_batch", "objective_images",
                     "objective_timesteps", "eval_images", "sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DugeError(f"attack setting {name} must be a whole number of at least 1, got {value!r}")
        if not self.inversion_learning_rate > 0:
            raise DugeError(f"attack setting inversion_learning_rate must be positive, got {self.inversion_learning_rate!r}")
        held_out = range(self.eval_seed, self.eval_seed + self.eval_images)
        used = range(self.seed, self.seed + self.objective_images)
        if held_out.start < used.stop and used.start < held_out.stop:
            raise DugeError(f"attack seeds overlap: the objective uses seeds {used.start}..{used.stop - 1} and the "
                            f"judgement {held_out.start}..{held_out.stop - 1}; the judgement's must be held out")

    @property
    def attacks(self) -> tuple[str, ...]:
        """The attacks to run, in order: ("prompt",), ("inversion",) or both."""
        return ("prompt", "inversion") if self.attack == "both" else (self.attack,)


def method_config(method: str, **overrides) -> UnlearnConfig:
    """An UnlearnConfig for `method`: UnlearnConfig's defaults, then the method's own (`duge.methods`: a
    baseline's paper or tuned settings), then `overrides`."""
    config = UnlearnConfig(method=method)
    for name, value in {**get_method(method).defaults, **overrides}.items():
        if name not in UnlearnConfig.__dataclass_fields__:
            raise DugeError(f"unknown setting {name!r} for method {method!r}")
        setattr(config, name, value)
    return config
