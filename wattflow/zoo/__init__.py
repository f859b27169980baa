"""Built-in models: one file each, registered by name in `MODELS`. A recipe names one (`train.model: resnet`)
or a user's own factory by import path (`train.model: {factory: "mymodels:build", kwargs: {...}}`).

Every built-in factory takes `input_shape` (one sample's shape) and `num_classes`, so the workload fills them
in from the data; its remaining keyword arguments are the recipe's. Add a model: a new file here whose factory
is decorated with `@MODELS.register("name")`, and its import below.
"""

from wattflow.plugins import Registry

MODELS: Registry = Registry("model")

from wattflow.zoo import cnn, gpt, mlp, resnet  # noqa: E402,F401  (each registers itself)
