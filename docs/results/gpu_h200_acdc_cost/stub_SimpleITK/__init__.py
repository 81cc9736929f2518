"""Stand-in for SimpleITK on the GPU machine (its 52 MB wheel does not fit the carry limit). Training from
preprocessed data never calls it; nnU-Net only imports it. Any use raises."""


class _Missing:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"SimpleITK.{self._name} called, but SimpleITK is not installed on this machine")

    def __getattr__(self, attr):
        return _Missing(f"{self._name}.{attr}")


def __getattr__(name):
    return _Missing(name)
