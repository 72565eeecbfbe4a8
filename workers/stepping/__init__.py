"""The diffusion worker's step scheduler: it ranks the requests a worker holds, forms each
denoising step's batch, preempts at step boundaries and drops expired or cancelled
requests (`scheduler`), and one loop thread per engine runs those steps (`loop`)."""

from workers.stepping.loop import StepLoop
from workers.stepping.request import ForwardCall, StepRequest, StepStatus, StepTicket
from workers.stepping.scheduler import StepScheduler

__all__ = ["ForwardCall", "StepLoop", "StepRequest", "StepScheduler", "StepStatus", "StepTicket"]
