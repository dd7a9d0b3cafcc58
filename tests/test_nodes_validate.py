"""Cheap input checks of the nodes: fix-it messages, linked (None) inputs, ranges core stops checking."""

import pytest

from self_forcing.nodes import logic_validate as v


def test_length_must_be_4k_plus_1_and_says_which_to_use():
    assert v.check_length(81) is None and v.check_length(1) is None
    assert v.check_length(80) == ("length 80 is not 4k+1 (Wan packs 4 frames per latent frame plus the first); "
                                  "use 77 or 81")
    assert "use 1 or 5" in v.check_length(3)
    assert "at least 1" in v.check_length(0)
    assert v.latent_frames(81) == 21 and v.pixel_frames(21) == 81 and v.latent_frames(477) == 120


def test_sizes_must_be_multiples_of_16():
    assert v.check_size("width", 832) is None
    assert v.check_size("width", 840) == "width 840 is not a multiple of 16; use 832 or 848"
    assert v.check_size("height", 8) == "height 8 is too small; use at least 16"
    assert v.check_extend_frames(80) is None
    assert v.check_extend_frames(30) == ("extend_frames 30 is not a multiple of 4 (one latent frame = 4 video "
                                         "frames); use 28 or 32")


def test_steps_parse_and_refuse_bad_lists():
    assert v.parse_steps("1000, 750, 500, 250") == (1000, 750, 500, 250)
    assert v.parse_steps(" 1000;500 ,") == (1000, 500)
    for bad, match in [("", "empty"), ("1000, x", "not a number"), ("500, 750", "strictly decreasing"),
                       ("1200, 500", "outside"), ("1000, 0", "outside"), ("750.5", "whole")]:
        with pytest.raises(ValueError, match=match):
            v.parse_steps(bad)


def test_linked_inputs_arrive_as_none_and_are_skipped():
    assert v.validate_generation() is True
    assert v.validate_generation(width=None, height=480, length=None, steps=None) is True
    assert v.validate_extension(extend_frames=None, history_frames=None) is True
    assert v.validate_long_video() is True


def test_validate_inputs_redoes_the_range_checks_core_switches_off():
    # Naming an input in validate_inputs disables core's min/max for it, so these must be caught here.
    assert "above the maximum" in v.validate_generation(width=8192)
    assert "below the minimum" in v.validate_generation(frames_per_block=0)
    assert "above the maximum" in v.validate_generation(length=4097)
    assert "below the minimum" in v.validate_extension(resample_strength=-0.1)
    assert "above the maximum" in v.validate_generation(context_noise=1001.0)
    assert "length 80 is not 4k+1" in v.validate_generation(width=832, height=480, length=80)
    assert "not a multiple of 4" in v.validate_extension(extend_frames=10)
    assert "strictly decreasing" in v.validate_generation(steps="250, 500")
    assert v.validate_generation(832, 480, 81, 3, "1000, 750, 500, 250", 5.0, 0.0) is True


def test_long_video_options_cross_checks():
    assert v.validate_long_video("rolling", 21, 3, 0) is True
    assert "not one of" in v.validate_long_video("sliding", 21, 3, 0)
    assert "routing_topk 21 is not smaller than the window 21" in v.validate_long_video("rolling", 21, 3, 21)
    assert v.validate_long_video("fixed", 21, 3, 50) is True  # the window does not apply to a fixed cache
    assert "sink 65" in v.validate_long_video(sink=65)
