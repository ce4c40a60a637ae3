"""vLLM's scheduler, never starting or ending a step inside an image (DyMU serving only).

A merged image's rows depend on all of its positions at once (see
:mod:`.groups`), so each image must reach the language model in one step.
``disable_chunked_mm_input`` alone does not ensure it: vLLM rolls a step back
to before an image only when the step starts before the image. A request
already computed up to an image's first placeholder (its previous step was
rolled back there) gets part of the image when the other requests of the step
left less token budget than the image needs and the image's encoder output
needs no encoder budget — the same image in another request of the step, or
still in the encoder cache. Two requests sharing an image, with suitable
prompt lengths, do that (tested); the part would then reach the model's
``embed_input_ids`` inside the engine step.

:class:`WholeItems` wraps vLLM's own choice of a step's encoder inputs
(``_try_schedule_encoder_inputs``, which every prefill step of a request with
images goes through): when the step would end inside an image, it ends before
the image instead, and the encoder inputs past that end are left for a later
step (their encoder budget returned). vLLM's load-time check that an image
fits in ``max_num_batched_tokens`` (made under ``disable_chunked_mm_input``,
which :mod:`.engine_checks` requires) keeps such a request schedulable.

A step can also *start* inside an image: a prefix-cache hit ends at a block
boundary wherever the requests sharing the prefix diverge, and that can be
inside an image they share (the same picture, then different questions).
:class:`WholeItems` rounds such a hit down to the image's start
(:func:`~.groups.prefix_hit_end`), so the image is encoded and run whole
again; hits ending before or after an image, shared system prompts and
earlier turns of a chat, are kept as vLLM finds them.

:class:`DyMUScheduler` is what the plugin's config hook names in
``scheduler_config.scheduler_cls``: it builds the whole-image form of the
scheduler vLLM picks itself (``AsyncScheduler`` under async scheduling,
``Scheduler`` otherwise), as that choice is made after the hook runs.
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from .groups import prefix_hit_end, whole_items_end


class WholeItems:
    """Mixin before a vLLM scheduler class (see module doc)."""

    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget,
                                     shift_computed_tokens: int = 0):
        run, num_new, budget, external, duplicate = super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, num_new_tokens, encoder_compute_budget,
            shift_computed_tokens=shift_computed_tokens)
        if not request.mm_features or num_new == 0:
            return run, num_new, budget, external, duplicate
        ranges = [f.mm_position for f in request.mm_features]
        cut = whole_items_end(ranges, num_computed_tokens, num_new)
        if cut == num_new:
            return run, num_new, budget, external, duplicate
        end = num_computed_tokens + cut

        def kept(items):
            return [i for i in items if ranges[i].offset < end]

        budget += sum(ranges[i].get_num_embeds() for i in run if ranges[i].offset >= end)
        return kept(run), cut, budget, kept(external), kept(duplicate)


    def _get_local_prefix_cache_hit(self, request):
        blocks, hit, boundary, diverged = super()._get_local_prefix_cache_hit(request)
        if hit and request.mm_features:
            end = prefix_hit_end([f.mm_position for f in request.mm_features], hit, self.block_size)
            if end < hit:
                blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, end)
                hit = end
        return blocks, hit, boundary, diverged


class WholeItemScheduler(WholeItems, Scheduler):
    pass


class WholeItemAsyncScheduler(WholeItems, AsyncScheduler):
    pass


class DyMUScheduler:
    """``scheduler_cls`` of a DyMU engine: builds :class:`WholeItemAsyncScheduler`
    or :class:`WholeItemScheduler`, as the engine's async scheduling says."""

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        return cls.scheduler_class(vllm_config)(*args, **kwargs)

    @staticmethod
    def scheduler_class(vllm_config) -> type:
        """The class built for ``vllm_config`` (async scheduling as vLLM resolved it)."""
        return WholeItemAsyncScheduler if vllm_config.scheduler_config.async_scheduling else WholeItemScheduler
