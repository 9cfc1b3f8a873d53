"""Time and money arithmetic shared by the billing rules.

Times are integer microseconds since the Unix epoch, UTC: PostgreSQL's own resolution, so every
boundary read from the database is exact. The one boundary that can fall between two microseconds
is the moment an org reaches its daily limit; it is a Fraction, which mixes with ints exactly.

Money is Decimal. A piece's charge is total_charge x piece / record, computed at 60 significant
digits; a finding is rounded to cents exactly once, half-up (SPEC 2.1).
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal
from fractions import Fraction
from functools import lru_cache

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
US = 1_000_000
HOUR_US = 3600 * US
DAY_US = 86400 * US
FOREVER = 2**62  # later than any real timestamp: the end of a window that never closed

Time = int | Fraction

_CTX = Context(prec=60)
_HOUR = Decimal(HOUR_US)


def to_us(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("naive datetime: every time the bot reads must be timezone-aware (UTC)")
    return (value - EPOCH) // timedelta(microseconds=1)


def from_us(value: Time) -> datetime:
    return EPOCH + timedelta(microseconds=int(value))


def td_us(value: timedelta) -> int:
    return value // timedelta(microseconds=1)


def day_start(value: Time) -> int:
    return int(value) // DAY_US * DAY_US


def day_of(value: Time) -> date:
    return from_us(day_start(value)).date()



def _dec(value: Time) -> Decimal:
    if isinstance(value, Fraction):
        return _CTX.divide(Decimal(value.numerator), Decimal(value.denominator))
    return Decimal(value)


def share(total: Decimal, part: Time, whole: int) -> Decimal:
    """total x part / whole, the charge of a piece of a record (SPEC 2.1)."""
    if whole <= 0:
        return Decimal(0)
    if isinstance(part, Fraction):
        num = _CTX.multiply(total, Decimal(part.numerator))
        return _CTX.divide(num, _CTX.multiply(Decimal(part.denominator), Decimal(whole)))
    return _CTX.divide(_CTX.multiply(total, Decimal(part)), Decimal(whole))


def scale(amount: Decimal, num: Time, den: Time) -> Decimal:
    """amount x num / den, exactly for terminating results and to 60 digits otherwise."""
    f = Fraction(num) / Fraction(den)
    return _CTX.divide(_CTX.multiply(amount, Decimal(f.numerator)), Decimal(f.denominator))


def hours(duration: Time) -> Decimal:
    return _CTX.divide(_dec(duration), _HOUR)


def cost(duration: Time, rate: Decimal) -> Decimal:
    """What a duration costs at an hourly rate."""
    return _CTX.multiply(hours(duration), rate)


def add(a: Decimal, b: Decimal) -> Decimal:
    return _CTX.add(a, b)


def sub(a: Decimal, b: Decimal) -> Decimal:
    return _CTX.subtract(a, b)


def to_cents(amount: Decimal) -> int:
    """Round once to whole cents, half-up.

    The amount first loses the noise of non-terminating divisions (60-digit arithmetic, far
    below 1e-30), so a true half cent such as 2.9955 is not seen as 2.99549999... .
    """
    clean = amount.quantize(Decimal("1e-30"), rounding=ROUND_HALF_EVEN, context=_CTX)
    return int((clean * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP, context=_CTX))


def hours_text(duration_hours: Decimal) -> str:
    """Hours as the JSON's decimal string: four places, like the database's numeric(10,4)."""
    return str(duration_hours.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP, context=_CTX))


@lru_cache(maxsize=4096)
def fmt_time(value: Time) -> str:
    """'2026-10-05 09:41 UTC', seconds shown only when there are some."""
    dt = from_us(value)
    if dt.second or dt.microsecond:
        return dt.strftime("%Y-%m-%d %H:%M:%S UTC")
    return dt.strftime("%Y-%m-%d %H:%M UTC")



def fmt_money(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


@lru_cache(maxsize=256)
def fmt_duration(value: timedelta | None) -> str:
    """'8h', '30m', '1h30m', '24h'; days only for multiples of a day past 48 hours."""
    if value is None:
        return "off"
    total = int(value.total_seconds())
    d, rem = divmod(total, 86400)
    if not (d >= 2 and rem == 0):
        d, rem = 0, total
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{d}d" if d else "", f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s else ""]
    return "".join(parts) or "0s"


def allocate(total_cents: int, weights: dict[str, Decimal]) -> dict[str, int]:
    """Split whole cents in proportion to weights, summing exactly to the total (largest remainder;
    ties go to the earlier key, so the split is stable)."""
    keys = sorted(k for k, w in weights.items() if w > 0)
    whole = sum((weights[k] for k in keys), Decimal(0))
    if total_cents <= 0 or not keys or whole <= 0:
        return {}
    shares = {k: _CTX.divide(_CTX.multiply(Decimal(total_cents), weights[k]), whole) for k in keys}
    out = {k: int(shares[k]) for k in keys}
    left = total_cents - sum(out.values())
    for k in sorted(keys, key=lambda k: (-(shares[k] - out[k]), k))[:left]:
        out[k] += 1
    return {k: v for k, v in out.items() if v}
