"""Disk profiles: the bandwidth and IOPS caps of cloud volumes people checkpoint to, as data.

A profile is emulated on this machine's disk by the kernel's I/O throttle (``throttle``): the run's
reads and writes on the device under ``--out`` are held to the profile's caps. Each built-in profile
says which volume it stands for and the published page its figures come from; ``--disk-limit``
makes one of the user's own. The throttle counts requests as the block layer issues them (up to
the device's largest request, 4 MiB here), where a cloud volume counts I/Os of up to 256 KiB (SSD)
or 1 MiB (HDD): a large sequential request costs fewer operations here than there.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .errors import UnknownChoiceError, UsageError

_MIB = 1 << 20
NONE = "none"
CUSTOM = "custom"
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(k|ki|m|mi|g|gi)?b?(?:/s)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "ki": 1 << 10, "m": 1e6, "mi": _MIB, "g": 1e9, "gi": 1 << 30}
_KEYS = {"read": "read_bps", "write": "write_bps", "riops": "read_iops", "wiops": "write_iops"}


@dataclass(frozen=True)
class Caps:
    """What the throttle allows: bytes/s and I/O operations/s for reads and writes; None is no cap."""

    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Caps:
        """``read=300M,write=300M,riops=3000,wiops=3000``: M and G are 10^6 and 10^9, Mi and Gi 2^20 and 2^30."""
        caps: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = part.partition("=")
            field = _KEYS.get(key.strip().lower())
            found = _SIZE.match(value.strip())
            if field is None or found is None:
                raise UsageError(
                    f"--disk-limit {spec!r}: {part!r} is not KEY=NUMBER; keys: {', '.join(_KEYS)} "
                    "(e.g. read=300M,write=300M,riops=3000,wiops=3000)"
                )
            number = round(float(found[1]) * _UNITS[(found[2] or "").lower()])
            if number < 1:
                raise UsageError(f"--disk-limit {spec!r}: {key} must be at least 1")
            caps[field] = number
        if not caps:
            raise UsageError(f"--disk-limit {spec!r} sets no cap; e.g. read=300M,write=300M,riops=3000,wiops=3000")
        return cls(**caps)

    @property
    def empty(self) -> bool:
        return all(v is None for v in asdict(self).values())

    @property
    def iops(self) -> bool:
        """Whether an operation rate is capped (then the probe also measures operations per second)."""
        return self.read_iops is not None or self.write_iops is not None

    def spec(self) -> str:
        """The caps as ``--disk-limit`` takes them, in exact bytes and operations."""
        return ",".join(f"{key}={getattr(self, field)}" for key, field in _KEYS.items() if getattr(self, field))

    def describe(self) -> str:
        parts = [
            f"{what} {value / 1e6:,.0f} MB/s"
            for what, value in (("read", self.read_bps), ("write", self.write_bps))
            if value is not None
        ]
        parts += [
            f"{value:,} {what} IOPS" for what, value in (("read", self.read_iops), ("write", self.write_iops)) if value
        ]
        return ", ".join(parts) or "no caps"


@dataclass(frozen=True)
class Profile:
    name: str
    caps: Caps
    volume: str
    """The volume it stands for."""
    source: str
    """Where the figures come from: the published page and what it states."""


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(NONE, Caps(), "this machine's disk, unthrottled (the default)", ""),
        Profile(
            "gp3-baseline",
            Caps(125 * _MIB, 125 * _MIB, 3000, 3000),
            "AWS EBS gp3 (general-purpose SSD) at its baseline: nothing provisioned beyond what the storage price "
            "includes",
            "3,000 IOPS (the default for gp3): https://docs.aws.amazon.com/sdk-for-kotlin/api/latest/ec2/"
            "aws.sdk.kotlin.services.ec2.model/-ebs-block-device/iops.html; 125 MiB/s (gp3 throughput "
            "ranges 125-1,000 MiB/s): https://docs.aws.amazon.com/sdkfornet/v3/apidocs/items/EMR/"
            "TVolumeSpecification.html; both as the baseline every gp3 volume comes with: "
            "https://cloudonaut.io/cheap-durable-fast-how-to-choose-an-ebs-volume-type/",
        ),
        Profile(
            "gp3-max",
            Caps(1000 * _MIB, 1000 * _MIB, 16000, 16000),
            "AWS EBS gp3 provisioned to its maximum",
            "16,000 IOPS (16 KiB I/O) and 1,000 MiB/s per gp3 volume: "
            "https://docs.aws.amazon.com/prescriptive-guidance/latest/sql-server-ec2-ha-dr/ebs-storage-types.html",
        ),
        Profile(
            "io2",
            Caps(1000 * _MIB, 1000 * _MIB, 64000, 64000),
            "AWS EBS io2 (provisioned-IOPS SSD, not Block Express) at its maximum",
            "64,000 IOPS (16 KiB I/O) and 1,000 MiB/s per io2 volume: "
            "https://docs.aws.amazon.com/prescriptive-guidance/latest/sql-server-ec2-ha-dr/ebs-storage-types.html",
        ),
        Profile(
            "st1",
            Caps(500 * _MIB, 500 * _MIB, 500, 500),
            "AWS EBS st1 (throughput-optimised network HDD) at its maximum",
            "500 MiB/s per volume: https://aws.amazon.com/ebs/throughput-optimized/; 500 IOPS (1 MiB I/O) per "
            "volume: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/EBSVolumeTypes.html",
        ),
    )
}


def resolve(profile: str = NONE, limit: str | None = None) -> Profile:
    """The profile a run asked for: a built-in by name, or ``custom`` from a ``--disk-limit`` spec."""
    if limit is not None:
        if profile != NONE:
            raise UsageError(f"--disk-profile {profile} and --disk-limit both set caps; give one of them")
        return Profile(CUSTOM, Caps.parse(limit), f"--disk-limit {limit}", "given by the user")
    if profile not in PROFILES:
        raise UnknownChoiceError("disk profile", profile, list(PROFILES))
    return PROFILES[profile]
