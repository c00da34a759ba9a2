"""Raw data -> prepared datasets (TFDS array_record, no TensorFlow needed).

Modules:
  layouts    raw folder layouts (brain_tumor_mri, chest_xray, split/class folders),
             label maps, patient ids from file names
  image_io   robust decoding (16-bit, RGBA, CMYK, palette, DICOM), resizing, PNG encoding
  hashing    byte/pixel hashes, perceptual hashes, near-duplicate search
  audit      ``python -m data_prep.audit --src=DIR --out=OUTDIR [--shortcut]``
  annotations  lesion annotations (YOLO, VIA, COCO, mask images) -> masks
  borrow     masks borrowed from the annotated dataset an image was copied from
  shortcut   metadata-only classifiers: can the label be guessed without the lesion?
  dataset_format  the prepared-dataset format: xmedjax_dataset.json, record keys,
             PreparedSource (raw records); shared with ``xmedjax``
  builder    the writer (TFDS GeneratorBasedBuilder + xmedjax_dataset.json); atomic rebuilds
  cli_errors one line per command failure (traceback under --verbosity=1 or in a log file)
  build      ``python -m data_prep.build --dataset=... --src=DIR --out=DIR``
  phantoms   synthetic brain-MRI / chest-X-ray phantoms with lesion masks
Training pipelines live in ``xmedjax.input_pipeline``. Nothing here imports ``xmedjax``.
"""
