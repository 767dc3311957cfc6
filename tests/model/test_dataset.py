import random

import numpy as np
import pytest

from inference_server.embedded import dataset
from inference_server.embedded.analyser import analyse


def test_same_seed_gives_identical_images_and_specs():
    a_images, a_specs = dataset.make_dataset(7, 24)
    b_images, b_specs = dataset.make_dataset(7, 24)
    assert a_images.shape == (24, 64, 64, 3) and a_images.dtype == np.uint8
    assert np.array_equal(a_images, b_images)
    assert a_specs == b_specs


def test_different_seeds_differ():
    a_images, _ = dataset.make_dataset(7, 8)
    b_images, _ = dataset.make_dataset(8, 8)
    assert not np.array_equal(a_images, b_images)


def test_specs_cover_the_required_vocabulary_and_keep_shape_inside():
    _, specs = dataset.make_dataset(3, 400)
    assert {s.shape for s in specs} >= {"circle", "square", "triangle"}
    required = {"red", "green", "blue", "yellow", "orange", "purple", "white", "black"}
    assert {s.colour for s in specs} >= required and {s.background for s in specs} >= required
    for s in specs:
        assert s.colour != s.background
        r = dataset.circumradius(s.shape, s.size)
        assert r <= s.cx <= 64 - r and r <= s.cy <= 64 - r
        assert abs(s.rotation_deg) <= dataset.MAX_ROTATION_DEG


def test_analyser_reads_the_ground_truth():
    images, specs = dataset.make_dataset(11, 120)
    for image, spec in zip(images, specs, strict=True):
        a = analyse(image)
        assert (a.background, a.colour, a.shape) == (spec.background, spec.colour, spec.shape), spec


def test_captions_and_variants():
    assert dataset.caption("circle", "red", "blue") == "a red circle on a blue background"
    assert dataset.caption("square", "orange", "white") == "an orange square on a white background"
    assert dataset.caption("circle", "red", "blue", 2) == "a blue background with a red circle"
    corpus = dataset.caption_corpus()
    assert len(corpus) == len(set(corpus)) == 3 * 8 * 7 * len(dataset.TEMPLATES)


def test_fixed_fields_are_respected_and_same_colour_rejected():
    spec = dataset.sample_spec(random.Random(1), shape="triangle", colour="green", background="black")
    assert (spec.shape, spec.colour, spec.background) == ("triangle", "green", "black")
    with pytest.raises(ValueError, match="both 'red'"):
        dataset.sample_spec(random.Random(1), colour="red", background="red")
