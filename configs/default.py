"""The paper's hyper-parameters; every other config starts from this one.

Not run directly: it names no dataset. Every key below is the full schema; a config that
adds a key, or a value of the wrong type or range, stops with a one-line error naming the
key (see xmedjax/config_checks.py) before anything compiles.

  python -m xmedjax.main --config=configs/brain_densenet.py --workdir=runs/brain_densenet \
      [--config.optimizer.learning_rate=3e-4] [--config.mode=evaluate|explain|predict]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # train (train, then evaluate the best checkpoint on val and test, then explain test),
    # evaluate, explain or predict; the last three use the run's best checkpoint.
    c.mode = "train"

    c.model = ml_collections.ConfigDict()
    c.model.arch = "densenet121"  # densenet121 | resnet50
    c.model.width = 1.0  # channel-width factor; 1.0 = torchvision (needed for ImageNet weights)
    c.model.dtype = "float32"  # float32 | bfloat16 (compute; parameters stay float32)

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "prepared"  # prepared (data_prep.build output) | phantoms (built in)
    c.data.data_dir = ""  # prepared: required; phantoms: '' = WORKDIR/data/phantoms
    c.data.phantom_kind = "brain"  # brain | chest
    c.data.phantom_counts = ml_collections.ConfigDict({"train": 512, "val": 128, "test": 256})
    c.data.phantom_seed = 0
    c.data.image_size = 224
    c.data.channels = 3  # 3 for ImageNet weights; greyscale images are repeated
    c.data.normalization = "imagenet"  # imagenet | unit | per_image (each image standardised)
    c.data.worker_count = 0  # Grain worker processes (0 = threads in this process)
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.test_split = "test"

    # Keras ImageDataGenerator semantics, as in the paper.
    c.augment = ml_collections.ConfigDict()
    c.augment.rotation_range = 20.0
    c.augment.width_shift_range = 0.1
    c.augment.height_shift_range = 0.1
    c.augment.zoom_range = 0.1
    c.augment.horizontal_flip = True
    # Intensity augmentation (xmedjax/intensity.py; not in the paper, all off): the
    # contrast, gamma, sharpness, resolution and noise a scanner or source changes.
    c.augment.resolution_range = 0.0  # shrink to [1 - r, 1] of the side and back
    c.augment.blur_sigma = 0.0  # Gaussian blur, sigma in [0, s] pixels
    c.augment.gamma_range = 0.0  # gamma in [1 / (1 + g), 1 + g], log-uniform
    c.augment.contrast_range = 0.0  # contrast x [1 - c, 1 + c]
    c.augment.brightness_range = 0.0  # + [-b, b]
    c.augment.noise_std = 0.0  # Gaussian noise, sigma in [0, n]
    # Counterfactual lesions (xmedjax/lesion_mix.py; needs lesion masks in the train split):
    # erase a lesion image's lesion (-> the lesion-free class), paste a lesion into a
    # lesion-free image (-> the donor's class); makes an image's source useless as a cue.
    c.augment.lesion_erase_prob = 0.0
    c.augment.lesion_paste_prob = 0.0
    c.augment.lesion_negative_class = ""  # the lesion-free class's name, e.g. notumor

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"  # adam | adamw | sgd
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.0  # adamw only
    c.optimizer.momentum = 0.9  # sgd only

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 32  # global, over all devices and processes
    c.training.eval_batch_size = 64
    c.training.max_epochs = 50
    c.training.max_steps = 0  # > 0 caps the total number of steps (smoke runs)
    c.training.early_stopping_patience = 10  # epochs without val-loss improvement; 0 = off
    c.training.early_stopping_min_delta = 0.0
    c.training.reduce_on_plateau_patience = 5  # epochs; 0 = off
    c.training.reduce_on_plateau_factor = 0.1
    c.training.min_learning_rate = 1e-7
    c.training.class_weighting = "none"  # none | balanced (n / (K * n_k), as Keras class_weight)
    c.training.checkpoint_every_steps = 200  # plus one at each epoch end
    c.training.best_metric = "val_loss"  # val_loss | val_accuracy | val_auc_roc
    c.training.log_every_steps = 10
    c.training.seed = 0

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # converted weights (python -m xmedjax.convert); '' = from scratch
    c.init.head = "reinit"  # reinit (fresh classifier) | strict

    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.bootstrap_samples = 1000
    c.evaluate.threshold = "youden"  # binary: youden (chosen on val) | 0.5

    c.explain = ml_collections.ConfigDict()
    c.explain.methods = ("gradcam",)
    c.explain.split = "test"
    c.explain.batch_size = 32
    c.explain.quality = True  # explain_quality.json: localisation, faithfulness, sanity checks
    c.explain.quality_images = 32  # images of the split the quality scores use
    c.explain.quality_methods = ()  # methods the quality scores compare; () = all the explain package offers

    c.predict = ml_collections.ConfigDict()
    c.predict.folder = ""  # images/DICOMs to classify (and explain) in predict or explain mode
    # Lesion annotations of predict.folder (a VIA/COCO JSON file, a YOLO labels folder or a
    # mask-image folder; '' = none): every method is scored against them and lesion reliance
    # is measured -> WORKDIR/explain_quality_folder.json.
    c.predict.annotations = ""
    c.predict.annotation_format = "auto"  # auto | via | coco | yolo | masks
    c.predict.positive_class = -1  # the lesion class the maps explain; -1 = the last class
    # The lesion-free class's name (e.g. notumor; '' = none): adds "any lesion" reliance and
    # detection (the other classes together) and, with more than two classes, the maps
    # explain each image's most probable lesion class.
    c.predict.negative_class = ""

    c.runtime = ml_collections.ConfigDict()
    c.runtime.compilation_cache_dir = "~/.cache/xmedjax/jax"  # '' = off
    c.runtime.distributed = "auto"  # auto (env of a multi-process launch) | on | off
    c.runtime.coordinator_address = ""  # host:port when distributed=on without env vars
    c.runtime.num_processes = 0
    c.runtime.process_id = -1
    c.runtime.progress_bar = True
    return c
