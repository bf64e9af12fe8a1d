"""Tiny synthetic tasks for tests of other modules (models, methods, training loops).

Real datasets take seconds to load and may not be installed; tests need something that loads in
milliseconds and is still *learnable*, so a broken training loop shows up as chance accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xbm.data.splits import generator
from xbm.data.task import TaskData


def make_fixture_task(name: str = "fixture", num_classes: int = 4, n_train: int = 64,
                      n_test: int = 32, seed: int = 0, image_size: int = 28) -> TaskData:
    """A small synthetic task whose classes have distinct spatial patterns.

    Each class gets a random blob pattern (a 4x4 random grid upsampled and thresholded); samples
    are that pattern shifted by up to 2 pixels, with random contrast and Gaussian noise. A small
    CNN separates the classes within a few epochs, while a constant predictor stays at chance.

    Args:
        name: task name.
        num_classes: number of classes (>= 2 for a meaningful task).
        n_train: training samples (labels cycle through the classes, then are shuffled).
        n_test: test samples.
        seed: generation seed; patterns and samples are reproducible from it.
        image_size: image side.
    """
    g = generator(seed)
    coarse = (torch.rand(num_classes, 1, 4, 4, generator=g) > 0.5).float()
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                           align_corners=False)
    protos = (protos > 0.5).float()

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % max(1, num_classes)
        y = y[torch.randperm(n, generator=g)]
        x = protos[y] if n else torch.zeros(0, 1, image_size, image_size)
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        x = torch.stack([torch.roll(x[i], (int(s[0]), int(s[1])), dims=(1, 2))
                         for i, s in enumerate(shifts)]) if n else x
        contrast = torch.rand(n, 1, 1, 1, generator=g) * 0.4 + 0.6
        x = x * contrast + torch.randn(x.shape, generator=g) * 0.1
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y.long()

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return TaskData(name, train_x, train_y, test_x, test_y,
                    [f"class{i}" for i in range(num_classes)])
