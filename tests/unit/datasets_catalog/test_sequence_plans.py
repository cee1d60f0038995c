"""Each task kind's sequence plan equals the docs/upstream-compat.md#sequence-plans table (and the upstream class code it describes).

Plans are written out by hand as (type, loss, enable_cfg, text or image slot) tuples.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from datasets_catalog.plan import RECON_SUFFIX, ImageSlot, Message, build_plan
from datasets_catalog.task_kinds import TASK_KINDS, resolve_task_kind

IN0, IN1, OUT0, OUT1 = ImageSlot("input", 0), ImageSlot("input", 1), ImageSlot("output", 0), ImageSlot("output", 1)


def T(text, loss, cfg):
    return ("text", loss, cfg, text)


def VIT(slot, loss, cfg):
    return ("vit_image", loss, cfg, slot)


def VAE(slot, loss, cfg):
    return ("vae_image", loss, cfg, slot)


def plan_of(kind, messages, n_input, n_output=0):
    msgs = [Message(role, value) for role, value in messages]
    plan = build_plan(resolve_task_kind(kind), msgs, n_input, n_output)
    return [(i.type, i.loss, i.enable_cfg, i.text if i.type == "text" else i.image) for i in plan.items]


SFT_MESSAGES = [
    ("human", "<image>\n Compare <image> please "),
    ("gpt", "Left lung opacity."),
    ("human", "  And now?  "),
    ("gpt", "Stable."),
]


def test_sft_ver1():
    assert plan_of("SftJSONLIterableDataset_Ver1", SFT_MESSAGES, 2) == [
        VIT(IN0, 0, 1), T("Compare", 0, 0), VIT(IN1, 0, 1), T("please", 0, 0),
        T("Left lung opacity.", 1, 0),
        T("  And now?  ", 0, 0),          # a turn without tags is kept verbatim
        T("Stable.", 1, 0),
    ]


def test_sft_ver1_image_index_is_per_turn_and_bounded_by_image_count():
    messages = [("human", "a <image> b <image>"), ("gpt", "x"), ("human", "<image> c"), ("gpt", "y")]
    assert plan_of("sft", messages, 1) == [
        T("a", 0, 0), VIT(IN0, 0, 1), T("b", 0, 0),  # the second tag (index 1) has no image: dropped
        T("x", 1, 0), VIT(IN0, 0, 1), T("c", 0, 0), T("y", 1, 0),
    ]


def test_vlm_sft_consumes_images_across_turns_without_cfg():
    messages = [("human", "<image> first"), ("gpt", "one"), ("human", "<image> second"), ("gpt", "two")]
    assert plan_of("vlm_sft", messages, 2) == [
        VIT(IN0, 0, 0), T("first", 0, 0), T("one", 1, 0), VIT(IN1, 0, 0), T("second", 0, 0), T("two", 1, 0),
    ]


def test_text_only_removes_tags_and_collapses_whitespace():
    messages = [("human", "<image>  What   is\n this? "), ("gpt", " A  chest film. "), ("human", "<image>"), ("gpt", "ok")]
    assert plan_of("text_only", messages, 0) == [
        T("What is this?", 0, 0), T("A chest film.", 1, 0), T("ok", 1, 0),  # empty turn dropped
    ]


def test_recon_ver1_suffix_and_reconstruction_targets():
    messages = [("human", "<image> Describe <image> both"), ("gpt", "Two views."), ("human", "More?"), ("gpt", "No.")]
    assert plan_of("SftJSONLIterableDataset_with_VisualReconstruction_Ver1", messages, 2) == [
        VIT(IN0, 0, 0), T("Describe", 0, 0), VIT(IN1, 0, 0), T("both " + RECON_SUFFIX, 0, 0),
        T("Two views.", 1, 0),
        T("More?" + RECON_SUFFIX, 0, 0),  # no space for a turn without images
        T("No.", 1, 0),
        VAE(IN0, 1, 0), VAE(IN1, 1, 0),
    ]


def test_recon_ver2_adds_vae_context_before_each_vit():
    messages = [("human", "Look <image>"), ("gpt", "Done.")]
    assert plan_of("sft_recon_v2", messages, 1) == [
        T("Look " + RECON_SUFFIX, 0, 0), VAE(IN0, 0, 0), VIT(IN0, 0, 0), T("Done.", 1, 0), VAE(IN0, 1, 0),
    ]


def test_t2i_texts_then_one_target_per_image():
    messages = [("human", "A chest X-ray"), ("gpt", "Here it is"), ("human", "")]
    assert plan_of("T2IIterableDataset_Ver1", messages, 1, 2) == [
        T("A chest X-ray", 0, 1), T("Here it is", 1, 0), VAE(OUT0, 1, 0), VAE(OUT1, 1, 0),
    ]
    # without output images the input images are the targets
    assert plan_of("t2i", [("human", "cap")], 1, 0) == [T("cap", 0, 1), VAE(IN0, 1, 0)]


def test_edit_uses_last_turns_and_no_cfg():
    messages = [("human", "old"), ("gpt", "old answer"), ("human", " <image> Stain it H&E "), ("gpt", " Done. ")]
    assert plan_of("MedicalImageEditingIterableDataset_ver1", messages, 1, 1) == [
        VAE(IN0, 0, 0), VIT(IN0, 0, 0), T("<image> Stain it H&E", 0, 0), T("Done.", 1, 0), VAE(OUT0, 1, 0),
    ]
    # an empty answer is left out
    assert plan_of("edit", [("human", "x"), ("gpt", " ")], 1, 1) == [
        VAE(IN0, 0, 0), VIT(IN0, 0, 0), T("x", 0, 0), VAE(OUT0, 1, 0),
    ]


def test_counterfactual_explanation_follows_the_target_image():
    messages = [("human", "<image>\nWhat if the nodule grew?"), ("gpt", " It would be larger. ")]
    assert plan_of("CounterfactualMedicalIterableDataset_ver1", messages, 1, 1) == [
        VAE(IN0, 0, 0), VIT(IN0, 0, 0), T("What if the nodule grew?", 0, 0), VAE(OUT0, 1, 0),
        T("It would be larger.", 1, 0),
    ]


@pytest.mark.parametrize("kind", [k.name for k in TASK_KINDS])
def test_every_kind_has_a_plan_with_a_loss(kind):
    k = resolve_task_kind(kind)
    messages = [Message("human", "<image> q"), Message("gpt", "a")]
    n_in = max(1, k.min_input_images) if k.needs_images else 0
    n_out = k.min_output_images
    plan = build_plan(k, messages, n_in, n_out)
    assert plan.has_loss
    for item in plan.items:  # every image a plan references exists in the record
        if item.image is not None:
            assert item.image.index < (n_in if item.image.role == "input" else n_out)


def test_a_new_kind_is_one_entry():
    """A kind built from fields alone gets its plan from them: here vlm_sft's in-order tags with sft_recon_v2's
    VAE + ViT context, CFG-droppable ViT."""
    kind = replace(resolve_task_kind("vlm_sft"), name="vlm_vae", vae_context=True, vit_cfg_dropout=True)
    msgs = [Message("human", "<image> a"), Message("gpt", "b"), Message("human", "c <image>"), Message("gpt", "d")]
    plan = [(i.type, i.loss, i.enable_cfg, i.text if i.type == "text" else i.image)
            for i in build_plan(kind, msgs, 2, 0).items]
    assert plan == [VAE(IN0, 0, 0), VIT(IN0, 0, 1), T("a", 0, 0), T("b", 1, 0), T("c", 0, 0), VAE(IN1, 0, 0),
                    VIT(IN1, 0, 1), T("d", 1, 0)]
    assert not kind.always_vit


def test_a_kind_naming_an_unknown_plan_is_refused():
    kind = replace(resolve_task_kind("sft"), plan="nope")
    with pytest.raises(ValueError, match="names plan 'nope'"):
        build_plan(kind, [Message("human", "q")], 0, 0)


def _shape(kind, messages, n_input, n_output=0):
    """(type, text or slot) of each plan element: the order and content, without loss / CFG flags."""
    return [(t, x) for t, _, _, x in plan_of(kind, messages, n_input, n_output)]


def test_text_after_an_extra_tag_is_kept():
    # upstream `(idx != last) and (idx < num_images)`: a second tag with one image shows nothing, but the
    # text after it stays
    assert _shape("sft", [("human", "<image> a <image> b"), ("gpt", "x")], 1) == \
        [("vit_image", IN0), ("text", "a"), ("text", "b"), ("text", "x")]


def test_in_order_tags_never_reference_a_missing_image():
    # vlm_sft consumes images across turns: the second turn's tag has no image left, its text stays
    assert _shape("vlm_sft", [("human", "<image> first"), ("gpt", "x"), ("human", "<image> second"),
                              ("gpt", "y")], 1) == \
        [("vit_image", IN0), ("text", "first"), ("text", "x"), ("text", "second"), ("text", "y")]


def test_empty_texts_are_skipped_not_the_rest():
    # t2i: an empty prompt is skipped (zero tokens upstream), the caption after it is kept
    assert _shape("t2i", [("human", ""), ("human", "a prompt"), ("gpt", "a caption")], 0, 1) == \
        [("text", "a prompt"), ("text", "a caption"), ("vae_image", OUT0)]
    # edit: a blank instruction adds no text
    assert [x for t, x in _shape("edit", [("human", "   "), ("gpt", "done")], 1, 1) if t == "text"] == ["done"]


def test_counterfactual_without_instruction_or_with_blank_explanation():
    only_gpt = _shape("counterfactual", [("gpt", "why")], 1, 1)
    assert [x for t, x in only_gpt if t == "text"] == ["why"]
    blank = _shape("counterfactual", [("human", "<image> make it worse"), ("gpt", "   ")], 1, 1)
    assert [x for t, x in blank if t == "text"] == ["make it worse"]
    assert blank[-1] == ("vae_image", OUT0)


def test_packed_length_counts_vit_and_vae_tokens_of_their_own_kind():
    from datasets_catalog.plan import ImageTokens, SamplePlan, packed_length

    plan = SamplePlan()
    plan.vae(IN0, loss=0, cfg=0)
    plan.vit(IN0, loss=0, cfg=0)
    plan.text("q", loss=0, cfg=0)
    plan.vae(OUT0, loss=1, cfg=0)
    images = {IN0: ImageTokens(vae_tokens=10, vit_tokens=7), OUT0: ImageTokens(vae_tokens=4, vit_tokens=99)}
    # 10 (VAE) + 7 (ViT) + 5 (text) + 4 (VAE) + 2 markers x 4 elements
    assert packed_length(plan, [5], images) == 10 + 7 + 5 + 4 + 8


def test_in_order_tags_take_the_images_one_after_another():
    turns = [("human", "<image> a"), ("gpt", "x"), ("human", "<image> b"), ("gpt", "y"), ("human", "<image> c"),
             ("gpt", "z")]
    assert [x for t, x in _shape("vlm_sft", turns, 3) if t == "vit_image"] == \
        [IN0, IN1, ImageSlot("input", 2)]


def test_unknown_plan_names_the_known_ones():
    kind = replace(resolve_task_kind("sft"), plan="nope")
    with pytest.raises(ValueError, match=r"names plan 'nope', which is not one of sft_turns, sft_recon, "
                                         r"text_only, t2i, edit, counterfactual$"):
        build_plan(kind, [Message("gpt", "x")], 0, 0)
