"""The ASR form trains: on real data (Fashion-MNIST, offline) and under torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import asrfx
from asrfx.data import fashion_mnist_available, load_fashion_mnist

import zoo


class SmallSENet(nn.Module):
    """Three conv-BN-ReLU stages, each followed by SE, then GAP and a classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, cin = [], 1
        for i, cout in enumerate((16, 32, 32)):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(), zoo.SELayer(cout)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs apt-get install dataset-fashion-mnist")
def test_asr_form_learns_fashion_mnist():
    """Converted model: loss falls, psi moves, and test accuracy beats chance by far."""
    torch.manual_seed(0)
    images, labels = load_fashion_mnist("train", limit=6000)
    test_images, test_labels = load_fashion_mnist("test", limit=1000)
    gm = asrfx.convert(SmallSENet(), images[:2]).train()
    psi_before = {n: p.detach().clone() for n, p in gm.named_parameters() if n.endswith("psi")}
    assert len(psi_before) == 3
    opt = torch.optim.Adam(gm.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        idx = torch.randint(0, len(images), (64,))
        loss = nn.functional.cross_entropy(gm(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    assert all(not torch.equal(p, psi_before[n]) for n, p in gm.named_parameters() if n in psi_before)
    gm.eval()
    with torch.no_grad():
        accuracy = (gm(test_images).argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.7, accuracy


def test_compiled_training_and_eval_match_eager():
    """convert -> torch.compile(fullgraph=True): no graph break; SGD steps and eval equal eager."""
    torch.manual_seed(0)
    gm = asrfx.convert(SmallSENet(), torch.randn(2, 1, 28, 28)).train()
    eager = copy.deepcopy(gm)
    compiled = torch.compile(gm, fullgraph=True)
    opt_c = torch.optim.SGD(gm.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    for _ in range(3):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        for model, opt in ((compiled, opt_c), (eager, opt_e)):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), q in zip(gm.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    gm.eval()
    eager.eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
