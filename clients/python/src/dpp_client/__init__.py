"""dpp-client: the Python client of DPP, the Decision Pack Platform (SPEC §7).

from dpp_client import Client

with Client() as dpp:  # DPP_URL and DPP_API_KEY from the environment
    print(dpp.run("echo", {"payload": "hello"}))
"""

from dpp_client._async import AsyncClient, AsyncRuns
from dpp_client._core import VERSION as __version__
from dpp_client._errors import (
    AuthenticationError,
    Conflict,
    ConnectionFailed,
    DPPError,
    Gone,
    InsufficientBudget,
    InvalidRequest,
    KeySpendLimitExceeded,
    NotFound,
    PaymentRequired,
    RateLimited,
    ResultIntegrityError,
    RunFailed,
    ServiceUnavailable,
)
from dpp_client._models import (
    Budget,
    KeyBudget,
    Pack,
    Plan,
    Run,
    RunPage,
    RunResult,
    Usage,
    UsageDay,
)
from dpp_client._sync import Client, Runs

__all__ = [
    "AsyncClient",
    "AsyncRuns",
    "AuthenticationError",
    "Budget",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DPPError",
    "Gone",
    "InsufficientBudget",
    "InvalidRequest",
    "KeyBudget",
    "KeySpendLimitExceeded",
    "NotFound",
    "Pack",
    "PaymentRequired",
    "Plan",
    "RateLimited",
    "ResultIntegrityError",
    "Run",
    "RunFailed",
    "RunPage",
    "RunResult",
    "Runs",
    "ServiceUnavailable",
    "Usage",
    "UsageDay",
    "__version__",
]
