#!/usr/bin/env python3
"""Load an `eio export --path ...` file into a PyTorch ResNet with DVERGE's module layout and
evaluate it on CIFAR-10, to check that a model leaves eio intact.

    python3 interop/scripts/check_dverge_export.py MODEL.safetensors CIFAR10_JPEG.tar.gz [--images N]

The network below is written from DVERGE's `models/resnet.py` key layout (conv1/bn1, three
stages of BasicBlocks with `downsample.{0,1}` 1x1 shortcuts, global average pooling, fc), the
layout `eio_interop::export` documents. `load_state_dict(strict=True)` must accept the file as
it is: every name and shape. The normaliser is read from the file's `eio.normalizer.*` metadata
and applied to pixels / 255, as eio's first op does. The data is an image-folder tarball
(`test/<class>/*.jpg`, classes in byte order) such as the shared CIFAR-10 JPEG set.

Needs torch, safetensors, numpy and Pillow; eio itself does not depend on any of them.
"""

import argparse
import io
import json
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet-(6k+2): widths 16, 32, 64, k blocks per stage."""

    def __init__(self, depth=20, classes=10):
        super().__init__()
        k = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, c_in = [], 16
        for c_out, stride in [(16, 1), (32, 2), (64, 2)]:
            blocks = []
            for b in range(k):
                blocks.append(BasicBlock(c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def test_images(tarball, limit):
    """(pixels [N, 3, 32, 32] in [0, 1], labels) of `test/<class>/*` in name order."""
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        entries = []
        for m in members:
            parts = m.name.split("/")
            if len(parts) >= 3 and parts[-3] == "test" and not parts[-1].startswith("."):
                entries.append((parts[-2], parts[-1], m))
        classes = sorted({c for c, _, _ in entries}, key=lambda s: s.encode())
        entries.sort(key=lambda e: (e[0].encode(), e[1].encode()))
        pixels, labels = [], []
        for c, _, m in entries:
            data = tar.extractfile(m).read()
            img = Image.open(io.BytesIO(data)).convert("RGB")
            pixels.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            labels.append(classes.index(c))
    x = torch.from_numpy(np.stack(pixels))
    y = torch.tensor(labels)
    if limit and limit < len(y):
        # A fixed, class-balanced subset: every (N/limit)-th image.
        keep = torch.linspace(0, len(y) - 1, limit).long()
        x, y = x[keep], y[keep]
    return x, y, classes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an `eio export --path ...` safetensors file")
    parser.add_argument("data", help="CIFAR-10 image-folder tarball (test/<class>/*.jpg)")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--images", type=int, default=0, help="0 = the whole test split")
    args = parser.parse_args()

    with safe_open(args.model, framework="pt") as f:
        meta = f.metadata() or {}
    mean = torch.tensor(json.loads(meta["eio.normalizer.mean"])).view(1, 3, 1, 1)
    std = torch.tensor(json.loads(meta["eio.normalizer.std"])).view(1, 3, 1, 1)

    net = ResNet(args.depth)
    state = load_file(args.model)
    net.load_state_dict(state, strict=True)
    net.eval()
    print(f"{args.model}: {len(state)} tensors loaded with strict=True "
          f"(path {meta.get('eio.gates', '?')}, plan {meta.get('eio.plan', '?')})")

    x, y, classes = test_images(args.data, args.images)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 500):
            logits = net((x[i:i + 500] - mean) / std)
            correct += (logits.argmax(1) == y[i:i + 500]).sum().item()
    print(f"accuracy {100.0 * correct / len(y):.2f} % on {len(y)} test images "
          f"({len(classes)} classes)")


if __name__ == "__main__":
    main()
