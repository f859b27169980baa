"""Dataset formats beyond the in-memory ones of wattflow.data: one file each, registered in
`wattflow.data.DATASETS`. Add a format: a new file here whose function `(DataConfig) -> Splits` is decorated
`@DATASETS.register("name")`, its import below, and its name in `config.DataConfig.dataset`."""

from wattflow.datasets import factory, image_folder, text  # noqa: F401  (each registers itself)
