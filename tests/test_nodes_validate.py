"""Cheap input checks of the nodes: fix-it messages, linked (None) inputs, ranges core stops checking."""

import pytest

from self_forcing.nodes import validate as v
from self_forcing.nodes.long_video import OPTIONS
from self_forcing.nodes.sampling import EXTEND, SAMPLER
from self_forcing.nodes.schema import check_inputs
from self_forcing.sf_model.latent_format import latent_frames, pixel_frames
from self_forcing.sf_model.schedule import parse_steps


def test_length_must_be_4k_plus_1_and_says_which_to_use():
    assert v.check_length(81) is None and v.check_length(1) is None
    assert v.check_length(80) == ("length 80 is not 4k+1 (Wan packs 4 frames per latent frame plus the first); "
                                  "use 77 or 81")
    assert "use 1 or 5" in v.check_length(3)
    assert "at least 1" in v.check_length(0)
    assert latent_frames(81) == 21 and pixel_frames(21) == 81 and latent_frames(477) == 120


def test_sizes_must_be_multiples_of_16():
    assert v.check_size("width", 832) is None
    assert v.check_size("width", 840) == "width 840 is not a multiple of 16; use 832 or 848"
    assert v.check_size("height", 8) == "height 8 is too small; use at least 16"
    assert v.check_extend_frames(80) is None
    assert v.check_extend_frames(30) == ("extend_frames 30 is not a multiple of 4 (one latent frame = 4 video "
                                         "frames); use 28 or 32")


def test_steps_parse_and_refuse_bad_lists():
    assert parse_steps("1000, 750, 500, 250") == (1000, 750, 500, 250)
    assert parse_steps(" 1000;500 ,") == (1000, 500)
    for bad, match in [("", "empty"), ("1000, x", "not a number"), ("500, 750", "strictly decreasing"),
                       ("1200, 500", "outside"), ("1000, 0", "outside"), ("750.5", "whole")]:
        with pytest.raises(ValueError, match=match):
            parse_steps(bad)


def test_linked_inputs_arrive_as_none_and_are_skipped():
    assert check_inputs(SAMPLER) is True
    assert check_inputs(SAMPLER, width=None, height=480, length=None, steps=None) is True
    assert check_inputs(EXTEND, extend_frames=None, history_frames=None) is True
    assert check_inputs(OPTIONS) is True


def test_validate_inputs_redoes_the_range_checks_core_switches_off():
    # Naming an input in validate_inputs disables core's min/max for it, so these must be caught here.
    assert "above the maximum" in check_inputs(SAMPLER, width=8192)
    assert "below the minimum" in check_inputs(SAMPLER, frames_per_block=0)
    assert "above the maximum" in check_inputs(SAMPLER, length=4097)
    assert "below the minimum" in check_inputs(EXTEND, resample_strength=-0.1)
    assert "above the maximum" in check_inputs(SAMPLER, context_noise=1001.0)
    assert "length 80 is not 4k+1" in check_inputs(SAMPLER, width=832, height=480, length=80)
    assert "not a multiple of 4" in check_inputs(EXTEND, extend_frames=10)
    assert "strictly decreasing" in check_inputs(SAMPLER, steps="250, 500")
    assert check_inputs(SAMPLER, width=832, height=480, length=81, frames_per_block=3, steps="1000, 750, 500, 250",
                        shift=5.0, context_noise=0.0) is True


def test_long_video_options_cross_checks():
    def options(cache=None, window=None, sink=None, routing_topk=None):
        return check_inputs(OPTIONS, cache=cache, window=window, sink=sink, routing_topk=routing_topk)

    assert options("rolling", 21, 3, 0) is True
    assert "not one of" in options("sliding", 21, 3, 0)
    assert "routing_topk 21 is not smaller than the window 21" in options("rolling", 21, 3, 21)
    assert options("fixed", 21, 3, 50) is True  # the window does not apply to a fixed cache
    assert "sink 65" in options(sink=65)


@pytest.mark.parametrize("spec, name", [(SAMPLER, "shift"), (SAMPLER, "context_noise"), (SAMPLER, "width"),
                                        (EXTEND, "resample_strength"), (OPTIONS, "window"), (OPTIONS, "sink")])
def test_ranges_come_from_the_spec_at_both_ends_and_refuse_nan(spec, name):
    i = spec.input(name)
    assert f"Range {i.bounds}." in i.tooltip and i.tooltip.endswith(".")  # the tooltip's range is the spec's
    assert check_inputs(spec, **{name: i.min}) is True and check_inputs(spec, **{name: i.max}) is True
    below = i.min - (i.step or 1)
    above = i.max + (i.step or 1)
    assert check_inputs(spec, **{name: below}) == f"{name} {below} is below the minimum {i.min}"
    assert check_inputs(spec, **{name: above}) == f"{name} {above} is above the maximum {i.max}"
    assert check_inputs(spec, **{name: float("nan")}).startswith(f"{name} is not a number (NaN)")


def test_a_range_written_once_in_a_new_spec_gives_the_tooltip_and_the_check():
    from self_forcing.nodes.schema import InputSpec, NodeSpec

    spec = NodeSpec("SelfForcingTest", "Test", "Self Forcing/test", "A test node.",
                    (InputSpec("strength", "FLOAT", "How strong.", default=0.5, min=0.25, max=2.0),
                     InputSpec("count", "INT", "How many.", default=1, min=1, max=8),
                     InputSpec("mode", "COMBO", "Which.", default="a", options=("a", "b"))))
    assert spec.input("strength").tooltip == "How strong. Range 0.25-2."
    assert spec.input("count").tooltip == "How many. Range 1-8."
    assert spec.input("mode").tooltip == "Which."
    assert check_inputs(spec, strength=0.25, count=8, mode="b") is True
    assert check_inputs(spec, strength=0.2) == "strength 0.2 is below the minimum 0.25"
    assert check_inputs(spec, count=9) == "count 9 is above the maximum 8"
    assert check_inputs(spec, strength=float("nan")) == "strength is not a number (NaN); use a value in 0.25-2"
    assert check_inputs(spec, mode="c") == "mode 'c' is not one of: a, b"
    assert check_inputs(spec, strength=None, count=None) is True  # linked inputs
