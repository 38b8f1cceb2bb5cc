"""Multiply-accumulates of each backbone family's scoring head against the backbone it reads (batch 1).

Explains the latency floor of `reports/families.md`: a head that does as much arithmetic as the backbone cannot run
in a small fraction of its time. Counts with torch's FlopCounterMode (matrix products and convolutions; element-wise
work is not counted), each family fitted on all the dataset's training images with its default configuration (the
iterative ones for one epoch: the head's size does not depend on training).

    python benchmarks/head_macs.py                       # bottle, PatchCore, PaDiM, STPM, FastFlow
    python benchmarks/head_macs.py --dataset magnetic_tile --families patchcore
"""

from __future__ import annotations

import argparse

from shared_data import DATASETS, WEIGHTS  # benchmarks/shared_data.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="bottle")
    parser.add_argument("--families", default="patchcore,padim,stpm,fastflow")
    args = parser.parse_args()
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from automl_ad.data import open_dataset
    from automl_ad.data.imageset import ImageSet
    from automl_ad.detectors import create_detector
    from automl_ad.detectors.blocks import Backbone

    dataset = open_dataset(DATASETS[args.dataset])
    train = ImageSet.from_records(dataset.normal_in("train"), dataset)  # every training image, as families.py
    for family in args.families.split(","):
        iterative = {"epochs": 1} if family in ("stpm", "fastflow") else {}
        detector = create_detector(family, weights=str(WEIGHTS), backbone="mobilenetv2_100", cache_features=False,
                                   **iterative)
        detector.fit(train)
        image = torch.from_numpy(detector.graph_input(train.subset([0])))
        with torch.no_grad(), FlopCounterMode(display=False) as backbone_count:
            features = Backbone(detector._extractor()).eval()(image)
        inputs = [image, *features] if detector.head_reads_images else list(features)
        with torch.no_grad(), FlopCounterMode(display=False) as head_count:
            detector._scoring_graph().eval()(*inputs)
        backbone, head = backbone_count.get_total_flops() / 2e6, head_count.get_total_flops() / 2e6
        shapes = ", ".join("x".join(str(s) for s in f.shape[1:]) for f in features)
        print(f"{family}: backbone {backbone:.0f} MMAC, head {head:.0f} MMAC ({head / backbone:.2f}x the backbone); "
              f"feature maps {shapes}", flush=True)


if __name__ == "__main__":
    main()
