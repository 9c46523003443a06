"""Config presets, overrides from text, and one-sentence validation errors."""

import dataclasses

from absl.testing import parameterized

from nnclr_tf import config as cfg


class PresetTest(parameterized.TestCase):

    @parameterized.parameters(*cfg.PRESETS)
    def test_every_preset_validates_and_round_trips(self, name):
        preset = cfg.get_preset(name)
        self.assertEqual(cfg.from_dict(preset.to_dict()), preset)

    def test_paper_preset_is_the_paper(self):
        paper = cfg.get_preset("imagenet_resnet50")
        self.assertEqual(paper.model.backbone, "resnet50")
        self.assertEqual(paper.model.queue_size, 98_304)
        self.assertEqual(paper.model.projection_dim, 256)
        self.assertEqual(paper.model.projection_hidden_dims, (2048, 2048))
        self.assertEqual(paper.model.prediction_hidden_dims, (4096,))
        self.assertEqual(paper.model.temperature, 0.1)
        self.assertEqual((paper.optim.optimizer, paper.optim.batch_size, paper.optim.epochs),
                         ("lars", 4096, 1000))
        self.assertEqual((paper.optim.weight_decay, paper.optim.warmup_epochs), (1e-6, 10.0))
        self.assertEqual(paper.augment.preset, "byol")
        self.assertEqual(paper.data.image_size, 224)

    def test_unknown_preset_suggests_a_close_name(self):
        with self.assertRaisesRegex(cfg.ConfigError, "Unknown preset 'dem'.*'demo'"):
            cfg.get_preset("dem")


class OverrideTest(parameterized.TestCase):

    def test_text_values_are_parsed_to_field_types(self):
        config = cfg.override(cfg.get_preset("demo"), {
            "model.queue_size": "8192", "model.temperature": "0.2", "run.jit_compile": "true",
            "model.projection_hidden_dims": "64,32", "augment.crop_scale": "(0.2, 1.0)",
            "data.data_dir": "none"})
        self.assertEqual(config.model.queue_size, 8192)
        self.assertEqual(config.model.temperature, 0.2)
        self.assertIs(config.run.jit_compile, True)
        self.assertEqual(config.model.projection_hidden_dims, (64, 32))
        self.assertEqual(config.augment.crop_scale, (0.2, 1.0))
        self.assertIsNone(config.data.data_dir)

    def test_override_does_not_mutate_the_base(self):
        base = cfg.get_preset("demo")
        cfg.override(base, {"model.queue_size": 8192})
        self.assertEqual(base.model.queue_size, 4096)

    @parameterized.named_parameters(
        ("negative_queue", {"model.queue_size": "-1"}, "model.queue_size must be > 0, got -1"),
        ("queue_below_batch", {"model.queue_size": "8"}, r"queue_size \(8\) must be >= the global batch"),
        ("temperature", {"model.temperature": "0"}, "temperature must be > 0"),
        ("backbone", {"model.backbone": "resnet19"}, "Unknown backbone 'resnet19'.*'resnet18'"),
        ("strategy", {"run.strategy": "gpu"}, "Unknown strategy 'gpu'"),
        ("crop_scale", {"augment.crop_scale": "0.5,0.1"}, "crop_scale must satisfy"),
        ("not_a_number", {"model.queue_size": "lots"}, "model.queue_size got 'lots'"),
        ("unknown_field", {"model.queu_size": "5"}, "Unknown field of model 'queu_size'.*'queue_size'"),
        ("unknown_section", {"modle.queue_size": "5"}, "Unknown config section 'modle'"),
        ("no_dot", {"queue_size": "5"}, "must look like section.field"),
        ("bool", {"run.jit_compile": "maybe"}, "not a valid bool"),
        ("finetune_batch", {"eval.finetune_batch_size": "0"}, "eval.finetune_batch_size must be >= 1, got 0"),
        ("linear_batch", {"eval.linear_batch_size": "-4"}, "eval.linear_batch_size must be >= 1, got -4"),
        ("finetune_lr", {"eval.finetune_learning_rate": "0"}, "eval.finetune_learning_rate must be > 0"),
        ("eval_examples", {"eval.max_eval_examples": "-1"}, "eval.max_eval_examples must be >= 0"),
        ("jpeg_decode", {"data.jpeg_decode": "crop"}, "data.jpeg_decode must be one of full, union, crops"),
    )
    def test_bad_values_raise_one_clear_sentence(self, overrides, pattern):
        with self.assertRaisesRegex(cfg.ConfigError, pattern) as caught:
            cfg.override(cfg.get_preset("demo"), overrides)
        self.assertNotIn("\n", str(caught.exception))

    def test_validate_catches_direct_construction(self):
        bad = dataclasses.replace(cfg.get_preset("demo"),
                                  optim=cfg.OptimConfig(batch_size=1))
        with self.assertRaisesRegex(cfg.ConfigError, "batch_size must be >= 2"):
            cfg.validate(bad)


def test_the_config_names_are_what_the_modules_build():
    # config.py holds the names (TensorFlow-free, for validation and --help); each module builds
    # them. A name added on one side only would pass validation and fail mid-run, or never be offered.
    from nnclr_tf import augment, backbones, optim

    assert set(cfg.AUGMENT_PRESETS) == set(augment.VIEW_PRESETS)
    assert optim.SCALINGS == cfg.LR_SCALINGS and optim.OPTIMIZERS == cfg.OPTIMIZERS
    for name in cfg.BACKBONES:
        encoder = backbones.build_backbone(name, input_shape=(32, 32, 1), width_multiplier=0.0625,
                                           cifar_stem=True)
        assert encoder.output_shape[-1] > 0
    for name in cfg.LR_SCALINGS:  # each accepted by the config is one the schedule knows
        config = cfg.override(cfg.get_preset("demo"), {"optim.lr_scaling": name})
        schedule = optim.WarmupCosine(1.0, 512, 10, 1, scaling=config.optim.lr_scaling)
        assert float(schedule(5)) > 0
