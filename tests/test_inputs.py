"""What people type, checked before anything is read (issue 12): amounts, tickets, periods."""
import pytest

from bot.actions.adjust import parse_amount
from bot.blocks import escape
from bot.cases_flow import parse_check_text
from services.inputs import InputError, validate_period, validate_ticket


@pytest.mark.parametrize("text,cents", [("12.34", 1234), ("$12.34", 1234), ("12", 1200), ("12.3", 1230),
                                        (" 0.01 ", 1), ("9999999999.99", 999999999999)])
def test_amounts_as_people_type_them(text, cents):
    assert parse_amount(text) == (cents, None)


@pytest.mark.parametrize("text", ["1E+30", "50,00", "1" * 40, "12.345", "-5", "0", "0.00", "NaN", "Infinity",
                                  "１２", "12.3.4", "", "$", "1_000"])
def test_anything_else_is_a_clear_error(text):
    cents, error = parse_amount(text)
    assert cents is None and error


def test_ticket_ids():
    assert validate_ticket("T-1234") == "T-1234" and validate_ticket("#5678") == "#5678"
    assert validate_ticket("") is None
    for bad in ("<!channel>", "a" * 65, "T 1", "T-1\nT-2", "tï"):
        with pytest.raises(InputError, match="invalid ticket id"):
            validate_ticket(bad)


def test_periods_take_ascii_digits_only():
    assert validate_period("2026-10") == "2026-10"
    for bad in ("２０２６-10", "2026-1０", "2026-13", "2026-00", "26-10"):
        with pytest.raises(InputError, match="malformed period"):
            validate_period(bad)


def test_the_command_text_refuses_a_ticket_that_pings():
    with pytest.raises(InputError, match="invalid ticket id"):
        parse_check_text("i-7f3a 2026-10 <!channel>")
    assert parse_check_text("i-7f3a 2026-10 T-9") == ("i-7f3a", ["2026-10"], "T-9")


def test_typed_text_cannot_ping_in_slack():
    assert escape("<!channel> & <@U1>") == "&lt;!channel&gt; &amp; &lt;@U1&gt;"
