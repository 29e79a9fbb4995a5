"""Build the configured annotator. Heavy parts (judge models, the openai SDK) load only here."""

from __future__ import annotations

from oaif.annotators.base import frozen
from oaif.config import AnnotatorConfig
from oaif.errors import AnnotatorError


def build_annotator(cfg: AnnotatorConfig, *, policy_path: str | None = None, reference=None, tokenizer=None,
                    cache_dir: str | None = None, device=None):
    """Return an object that satisfies :class:`oaif.annotators.base.Annotator`.

    When ``annotator.model`` names the same model as the policy, the LLM judge reuses the frozen
    reference model (the starting policy) instead of loading a second copy.
    """
    if cfg.type == "callable":
        from oaif.annotators.callable_judge import CallableJudge

        return CallableJudge(cfg.callable, both_orders=cfg.both_orders)
    if cfg.type == "llm":
        from oaif.annotators.llm_judge import LLMJudge
        from oaif.annotators.rubrics import load_rubric

        rubric = load_rubric(cfg.rubric)
        if reference is not None and cfg.model == policy_path and tokenizer is not None:
            model, tok = reference, tokenizer
        else:
            from oaif.models import load_causal_lm

            model, tok = load_causal_lm(cfg.model, dtype=cfg.dtype, cache_dir=cache_dir)
            frozen(model, device)
        return LLMJudge(model, tok, rubric, both_orders=cfg.both_orders, batch_size=cfg.batch_size,
                        max_length=cfg.max_length, name=f"llm:{cfg.model}:{rubric.name}")
    if cfg.type == "reward_model":
        from oaif.annotators.reward_model_judge import RewardModelJudge

        return RewardModelJudge.from_pretrained(cfg.model, dtype=cfg.dtype, device=device, cache_dir=cache_dir,
                                                batch_size=cfg.batch_size, max_length=cfg.max_length)
    if cfg.type == "ensemble":
        import dataclasses

        from oaif.annotators.ensemble import EnsembleJudge
        from oaif.config.overrides import apply_mapping

        members = []
        for i, spec in enumerate(cfg.members):
            member = dataclasses.replace(cfg, members=[])
            if not isinstance(spec, dict) or spec.get("type") == "ensemble":
                raise AnnotatorError(f"annotator.members[{i}]: expected a mapping of annotator keys (not an ensemble)")
            apply_mapping(member, spec, f"annotator.members[{i}].")
            members.append(build_annotator(member, policy_path=policy_path, reference=reference, tokenizer=tokenizer,
                                           cache_dir=cache_dir, device=device))
        return EnsembleJudge(members, mode=cfg.ensemble_mode)
    if cfg.type == "openai":
        from oaif.annotators.openai_judge import OpenAIJudge
        from oaif.annotators.rubrics import load_rubric

        try:
            return OpenAIJudge(cfg.base_url, cfg.model, load_rubric(cfg.rubric), api_key_env=cfg.api_key_env,
                               timeout=cfg.request_timeout, max_retries=cfg.max_retries, concurrency=cfg.concurrency,
                               both_orders=cfg.both_orders, top_logprobs=cfg.top_logprobs)
        except ImportError:
            raise AnnotatorError("annotator.type=openai needs the openai package: pip install 'oaif[openai]'") from None
    raise AnnotatorError(f"annotator.type={cfg.type!r} is not available yet in this build")
