"""Train a small classifier on real images only, then on real + synthetic images, and compare.

A complete torchvision training script. The augment-gan parts are the recipe (`transform=`), the
synthetic dataset and the mixed sampler; everything else is what any classification script does.

    python examples/train_classifier.py --real examples/digits                       # real only
    python examples/train_classifier.py --real examples/digits --synthetic synthetic/digits
    python examples/train_classifier.py --real examples/digits --generator runs/digits --n 2000

`--synthetic` is a folder written by `augment-gan synth`; `--generator` samples a checkpoint on the fly
(no disk). The real folder is split into train and test sets (stratified, `--test-split`); the test
images are never augmented and never mixed with synthetic ones. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from augment_gan import GeneratorDataset, MixedDataset, MixedSampler, SyntheticImageFolder, load_recipe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--real", required=True, help="real ImageFolder (one subfolder per class)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", help="folder written by `augment-gan synth`")
    source.add_argument("--generator", help="checkpoint or run directory to sample on the fly")
    parser.add_argument("--n", type=int, default=2000, help="images to sample with --generator")
    parser.add_argument("--recipe", default="standard", help="recipe name or YAML path")
    parser.add_argument("--ratio", type=float, default=None,
                        help="synthetic share of each batch (default: the recipe's mix.synthetic_ratio)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, default=32, help="side length every image is resized to")
    parser.add_argument("--test-split", type=float, default=0.3, help="share of each real class held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if not 0 < args.test_split < 1:
        parser.error("--test-split must be in (0, 1)")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive")
    return args


def stratified_split(targets: list[int], test_share: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out `test_share` of every class (at least one image), chosen by a seeded shuffle."""
    by_class = defaultdict(list)
    for index, label in enumerate(targets):
        by_class[label].append(index)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
        n_test = max(1, round(test_share * len(indices)))
        test += order[:n_test]
        train += order[n_test:]
    return sorted(train), sorted(test)


class SmallCNN(nn.Module):
    """Four narrow conv blocks and a linear head: enough for 32 px digits or icons, fast on a CPU."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(channels, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2),
                                      block(32, 64), nn.MaxPool2d(2), block(64, 64), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def train_and_test(train_set: MixedDataset, test_loader: DataLoader, num_classes: int, args) -> dict:
    torch.manual_seed(args.seed)  # same initial weights for every run
    model = SmallCNN(3, num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    sampler = MixedSampler(train_set, seed=args.seed)  # holds the real:synthetic share in every batch
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        drop_last=len(sampler) >= args.batch_size)
    step, start = 0, time.time()
    model.train()
    while step < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == args.steps:
                break
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return {"accuracy": correct / total, "seconds": time.time() - start, "test": total}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    resize = T.Resize((args.size, args.size))  # real and synthetic images may differ in size

    # Real data: the user's ImageFolder, with the recipe as its transform.
    recipe = load_recipe(args.recipe, seed=args.seed)
    real = ImageFolder(args.real, transform=T.Compose([resize, recipe]))
    train_idx, test_idx = stratified_split(real.targets, args.test_split, args.seed)
    plain = ImageFolder(args.real, transform=T.Compose([resize, recipe.to_tensor]))  # test: no augmentation
    test_loader = DataLoader(Subset(plain, test_idx), batch_size=256)
    train_real = Subset(real, train_idx)

    runs = [("real only", MixedDataset(train_real, None, 0.0))]

    # Synthetic data, labeled like the real classes, with the recipe's synthetic pipeline.
    synthetic_recipe = load_recipe(args.recipe, part="synthetic", seed=args.seed + 1)
    synthetic_transform = T.Compose([resize, synthetic_recipe])
    synthetic = None
    if args.synthetic:
        synthetic = SyntheticImageFolder(args.synthetic, transform=synthetic_transform,
                                         class_to_idx=real.class_to_idx)
    elif args.generator:
        synthetic = GeneratorDataset(args.generator, args.n, seed=args.seed, transform=synthetic_transform,
                                     class_to_idx=real.class_to_idx)
    if synthetic is not None:
        ratio = recipe.ratio if args.ratio is None else args.ratio
        if ratio == 0:
            print(f"recipe {recipe.name} uses no synthetic data; pass --ratio to override", file=sys.stderr)
        else:
            runs.append((f"real + synthetic ({ratio:.0%})", MixedDataset(train_real, synthetic, ratio)))

    print(f"{len(train_idx)} real training images, {len(test_idx)} test images, {len(real.classes)} classes, "
          f"recipe {recipe.name}, {args.steps} steps of {args.batch_size}", file=sys.stderr)
    rows = []
    for name, dataset in runs:
        recipe.reseed(args.seed)  # every run sees the same real augmentations
        synthetic_recipe.reseed(args.seed + 1)
        result = train_and_test(dataset, test_loader, len(real.classes), args)
        rows.append((name, dataset.n_synthetic, result))
        print(f"{name}: test accuracy {result['accuracy']:.3f} ({result['seconds']:.0f} s)", file=sys.stderr)

    print("| training data | synthetic images | test accuracy | train time |")
    print("|---|---:|---:|---:|")
    for name, n_synthetic, result in rows:
        print(f"| {name} | {n_synthetic:,} | {result['accuracy']:.3f} | {result['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
