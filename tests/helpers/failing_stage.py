"""An SFT stage that fails on rank 1 only: the launch must stop rank 0 and report rank 1's error."""

from rlhf.distributed import process_state
from rlhf.stage import StageError
from stages.sft import SFTStage


class FailsOnRankOne(SFTStage):
    def setup(self) -> None:
        if process_state().process_index == 1:
            raise StageError("sft: deliberate failure on this rank")
        super().setup()
