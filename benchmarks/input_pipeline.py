"""Input-pipeline throughput: decode + augment + batch, images/s per worker count.

  python benchmarks/input_pipeline.py --data_dir=/tmp/prep_brain --workers=0,1,2 \
      [--image_size=224] [--batch_size=32] [--seconds=20] [--channels=3]

Build the prepared dataset first (outside the repo), e.g.
  python -m data_prep.build --dataset=brain_tumor_mri --src=../shared/data/brain_tumor_mri \
      --out=/tmp/prep_brain
Not a test. The first batch (worker start-up, file opening) is excluded from the timing.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xmedjax import augment, input_pipeline  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "prepared dataset", required=True)
flags.DEFINE_string("split", "train", "split to read")
flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker counts to time")
flags.DEFINE_integer("image_size", 224, "model input size")
flags.DEFINE_integer("channels", 3, "model input channels")
flags.DEFINE_integer("batch_size", 32, "global batch size")
flags.DEFINE_float("seconds", 20.0, "timed seconds per worker count")
flags.DEFINE_bool("augment", True, "apply the paper's augmentation")


def time_workers(workers: int) -> tuple[float, int]:
    """Returns (images/s, images timed) for one worker count."""
    it = input_pipeline.make_train_iterator(
        FLAGS.data_dir,
        FLAGS.split,
        global_batch_size=FLAGS.batch_size,
        preprocess=input_pipeline.Preprocess(FLAGS.image_size, FLAGS.channels, "imagenet"),
        augment=augment.PAPER_DEFAULTS if FLAGS.augment else None,
        seed=0,
        worker_count=workers,
        shard_index=0,
        shard_count=1,
    )
    next(it)  # start-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < FLAGS.seconds:
        b = next(it)
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t0), n


def main(argv):
    del argv
    info = input_pipeline.read_dataset_info(FLAGS.data_dir)
    print(
        f"dataset {info.name} ({info.splits}), stored size {info.size}, "
        f"{info.channels} channel(s) -> {FLAGS.image_size} px x {FLAGS.channels}; "
        f"batch {FLAGS.batch_size}; augment={FLAGS.augment}; cpus={os.cpu_count()}"
    )
    for w in FLAGS.workers:
        rate, n = time_workers(int(w))
        print(f"workers={w}: {rate:8.1f} images/s ({n} images)", flush=True)


if __name__ == "__main__":
    app.run(main)
