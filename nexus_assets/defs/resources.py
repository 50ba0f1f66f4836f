"""Compute and storage resources shared by the assets."""

import os

import dagster as dg
from pydantic import Field


class NexusCompute(dg.ConfigurableResource):
    """Where heavy steps run: device, dtype, and the memory budget that sizes towers and decides when
    a teacher is layer-streamed. GPU-bound assets also sit in the `gpu` concurrency pool (dagster.yaml
    limits it), so one teacher occupies a GPU at a time."""

    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1'")
    dtype: str = Field("auto", description="'auto' (bf16 on CUDA, fp32 on CPU), 'float32', 'bfloat16'")
    memory_budget_gb: float = Field(
        0.0, description="memory a step may use for weights + activations; 0 = detect (GPU memory or 60% of RAM)"
    )
    num_threads: int = Field(0, description="torch intra-op threads on CPU; 0 = torch default")

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"NexusCompute.device={self.device!r} but CUDA is not available on this machine")
        return self.device

    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def memory_budget_bytes(self) -> int:
        if self.memory_budget_gb > 0:
            return int(self.memory_budget_gb * 2**30)
        import torch

        if self.resolved_device().startswith("cuda"):
            return int(torch.cuda.get_device_properties(0).total_memory * 0.9)
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages * 0.6)

    def setup_torch(self) -> None:
        import torch

        if self.num_threads > 0:
            torch.set_num_threads(self.num_threads)


def default_resources() -> dict:
    from nexus_assets.core.paths import artifacts_root

    return {
        "compute": NexusCompute(
            device=os.environ.get("NEXUS_DEVICE", "auto"),
            memory_budget_gb=float(os.environ.get("NEXUS_MEMORY_BUDGET_GB", "0")),
        ),
        "io_manager": dg.FilesystemIOManager(base_dir=str(artifacts_root() / "_dagster_io")),
    }
