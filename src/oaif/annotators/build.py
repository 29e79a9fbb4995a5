"""Build the configured annotator: one builder per ``annotator.type`` (:data:`JUDGE_TYPES`).

Building is two steps. :func:`plan_annotator` runs the type's builder, which does now what is
cheap and can fail (the rubric read, the callable imported and its signature checked, every
ensemble member planned) and returns a plan; calling the plan with a :class:`JudgeContext` loads
what the judge needs (a model, the openai SDK: heavy parts load only there), once.
``run.build.preflight`` plans before any model loads and ``run.build.build_run`` builds from that
plan; :func:`build_annotator` plans and builds in one call (``oaif annotate``, ``oaif eval``).

``annotator.model=policy`` (self-judging) makes the policy being trained its own LLM judge: the
context's ``policy``, called inside its DDP wrapper (:func:`oaif.models.modules.without_ddp`), so it
judges with its current weights, its adapter and the run's autocast. Only a training run has one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from oaif.annotators.base import frozen
from oaif.config import POLICY_JUDGE, AnnotatorConfig
from oaif.errors import AnnotatorError


@dataclass
class JudgeContext:
    """What the caller already holds, and where a judge's model goes.

    ``reference`` and ``tokenizer`` (the frozen starting policy, loaded from ``policy_path``) serve an
    in-process judge whose ``annotator.model`` names the policy's model instead of a second copy.
    Judge models that one build loads are kept in ``loaded``, so ensemble members that name the same
    model (and dtype) share one copy. ``policy`` (the prepared policy being trained) is the judge that
    ``annotator.model=policy`` names; without one (``oaif annotate``, ``oaif eval``) that is an error.
    """

    policy_path: str | None = None
    reference: Any = None
    tokenizer: Any = None
    cache_dir: str | None = None
    device: Any = None
    loaded: dict = field(default_factory=dict)
    policy: Any = None

    def causal_lm(self, name: str, dtype: str) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the judge model ``name``: the reference when it is the policy's model,
        else loaded (frozen, on ``device``) the first time this build asks for it; for ``policy``, the live
        policy itself (its weights train: the judge runs it in eval mode without gradients, per call)."""
        if name == POLICY_JUDGE:
            if self.policy is None:
                raise AnnotatorError(NO_POLICY)
            from oaif.models.modules import without_ddp

            return without_ddp(self.policy), self.tokenizer
        if self.reference is not None and self.tokenizer is not None and name == self.policy_path:
            return self.reference, self.tokenizer
        if (name, dtype) not in self.loaded:
            from oaif.models.load import load_causal_lm

            model, tok = load_causal_lm(name, dtype=dtype, cache_dir=self.cache_dir)
            self.loaded[name, dtype] = frozen(model, self.device), tok
        return self.loaded[name, dtype]


#: A planned judge: called with a :class:`JudgeContext`, it loads what it needs and returns the annotator.
JudgePlan = Callable[[JudgeContext], Any]


def _callable(cfg: AnnotatorConfig) -> JudgePlan:
    from oaif.annotators.callable_judge import CallableJudge

    judge = CallableJudge(cfg.callable, both_orders=cfg.both_orders)  # imported, its arguments checked
    return lambda ctx: judge


def _llm(cfg: AnnotatorConfig) -> JudgePlan:
    from oaif.annotators.rubrics import load_rubric

    rubric = load_rubric(cfg.rubric)

    def build(ctx: JudgeContext):
        from oaif.annotators.llm_judge import LLMJudge

        model, tok = ctx.causal_lm(cfg.model, cfg.dtype)
        return LLMJudge(model, tok, rubric, both_orders=cfg.both_orders, batch_size=cfg.batch_size,
                        max_length=cfg.max_length, name=f"llm:{cfg.model}:{rubric.name}")

    return build


def _reward_model(cfg: AnnotatorConfig) -> JudgePlan:
    def build(ctx: JudgeContext):
        from oaif.annotators.reward_model_judge import RewardModelJudge

        return RewardModelJudge.from_pretrained(cfg.model, dtype=cfg.dtype, device=ctx.device, cache_dir=ctx.cache_dir,
                                                batch_size=cfg.batch_size, max_length=cfg.max_length)

    return build


def _openai(cfg: AnnotatorConfig) -> JudgePlan:
    from oaif.annotators.rubrics import load_rubric

    rubric = load_rubric(cfg.rubric)

    def build(ctx: JudgeContext):
        from oaif.annotators.openai_judge import OpenAIJudge

        try:
            return OpenAIJudge(cfg.base_url, cfg.model, rubric, api_key_env=cfg.api_key_env,
                               timeout=cfg.request_timeout, max_retries=cfg.max_retries, concurrency=cfg.concurrency,
                               both_orders=cfg.both_orders, top_logprobs=cfg.top_logprobs)
        except ImportError:
            raise AnnotatorError("annotator.type=openai needs the openai package: pip install 'oaif[openai]'") from None

    return build


def _ensemble(cfg: AnnotatorConfig) -> JudgePlan:
    members = [plan_annotator(_member(cfg, i, spec)) for i, spec in enumerate(cfg.members)]

    def build(ctx: JudgeContext):
        from oaif.annotators.ensemble import EnsembleJudge

        return EnsembleJudge([member(ctx) for member in members], mode=cfg.ensemble_mode)

    return build


def _member(cfg: AnnotatorConfig, i: int, spec: Any) -> AnnotatorConfig:
    """Ensemble member ``i``: the ensemble's keys with the member's mapping over them."""
    from oaif.config.overrides import apply_mapping

    if not isinstance(spec, dict) or spec.get("type") == "ensemble":
        raise AnnotatorError(f"annotator.members[{i}]: expected a mapping of annotator keys (not an ensemble)")
    member = dataclasses.replace(cfg, members=[])
    apply_mapping(member, spec, f"annotator.members[{i}].")
    return member


#: ``annotator.type`` -> its builder: checks and reads what is cheap now, returns the plan that loads the rest.
JUDGE_TYPES: dict[str, Callable[[AnnotatorConfig], JudgePlan]] = {
    "llm": _llm,
    "openai": _openai,
    "reward_model": _reward_model,
    "callable": _callable,
    "ensemble": _ensemble,
}


NO_POLICY = ("annotator.model=policy: there is no policy being trained here to judge with (self-judging is "
             "for oaif train); name a judge model, e.g. model=smollm2-135m-instruct")


def judges_with_policy(cfg: AnnotatorConfig) -> bool:
    """Whether ``cfg`` (or one of its ensemble members) makes the policy being trained its judge."""
    specs = [m for m in cfg.members if isinstance(m, dict)]
    return cfg.model == POLICY_JUDGE or any(m.get("model") == POLICY_JUDGE for m in specs)


def plan_annotator(cfg: AnnotatorConfig) -> JudgePlan:
    """The judge ``cfg`` configures, planned: everything cheap checked, no model loaded yet."""
    builder = JUDGE_TYPES.get(cfg.type)
    if builder is None:
        raise AnnotatorError(f"annotator.type={cfg.type!r} is not available yet in this build")
    return builder(cfg)


def build_annotator(cfg: AnnotatorConfig, *, policy_path: str | None = None, reference=None, tokenizer=None,
                    cache_dir: str | None = None, device=None):
    """Return an object that satisfies :class:`oaif.annotators.base.Annotator`.

    When ``annotator.model`` names the same model as the policy (``policy_path``), the LLM judge
    reuses the frozen ``reference`` model (the starting policy) instead of loading a second copy.
    There is no policy being trained here, so ``annotator.model=policy`` is an error.
    """
    if judges_with_policy(cfg):
        raise AnnotatorError(NO_POLICY)
    return plan_annotator(cfg)(JudgeContext(policy_path, reference, tokenizer, cache_dir, device))
