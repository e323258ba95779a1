"""A seeded synthetic "demo world" written in the annotation formats of the ALBEF release.

No real image-text corpus can be downloaded where the demo runs, so this package renders scenes of
one to four coloured shapes on varied backgrounds and writes, for those scenes, the files that
ALBEF's data code reads: pretraining pairs (and an img2dataset url list), retrieval, VQA, NLVR² and
SNLI-VE annotations, and labelled images (shapes and colours present) for the image encoder's
supervised initialisation, the demo's ImageNet (:mod:`codis.train.vision_init`). The demo then
exercises the same download, sharding, loading and evaluation code as a real run.

Neither modality alone solves the tasks: backgrounds come from a small shared set of presets chosen
independently of the captions (:mod:`.scenes`); captions name colours, shapes, sizes, counts,
positions and spatial relations (:mod:`.language`); VQA answers, NLVR² labels and SNLI-VE labels
are balanced so that the text says nothing about them (:mod:`.questions`). The manifest records
the scores that need no model (:mod:`.baselines`).

Everything is a pure function of :class:`DemoWorldConfig`: the same config gives byte-identical
files (:func:`generate_demo_world`). Sidecar files under ``meta/`` (scene specs and VQA question
types) are for tests and debugging; the ALBEF-format files do not need them.
"""

from codis.data.demo_world.config import DemoWorldConfig
from codis.data.demo_world.generate import GENERATOR_VERSION, generate_demo_world
from codis.data.demo_world.questions import VQA_QUESTION_TYPES
from codis.data.demo_world.scenes import COLORS, RELATIONS, SHAPES, SIZES

__all__ = ["COLORS", "GENERATOR_VERSION", "RELATIONS", "SHAPES", "SIZES", "VQA_QUESTION_TYPES",
           "DemoWorldConfig", "generate_demo_world"]
