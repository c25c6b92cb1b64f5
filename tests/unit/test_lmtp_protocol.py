"""lmtp.protocol: the sans-IO LMTP client state machine, driven by scripted server bytes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp.dotstuff import encode_data
from lmtp.errors import (
    ConnectionLost,
    ExtensionNotSupported,
    LocalProtocolError,
    RemoteProtocolError,
    ServerUnavailable,
)
from lmtp.protocol import (
    NEED_DATA,
    ClientProtocol,
    ConnectionClosed,
    Event,
    Greeting,
    SendPayload,
    SessionReady,
    State,
    TransactionDone,
)
from lmtp.replies import Reply

GREETING = b"220 mx.example LMTP ready\r\n"
LHLO_OK = (
    b"250-mx.example\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-PIPELINING\r\n250-SMTPUTF8\r\n250 SIZE 10240000\r\n"
)
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"

OK_MAIL = b"250 2.1.0 Ok\r\n"
OK_RCPT = b"250 2.1.5 Ok\r\n"
GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
DELIVERED = b"250 2.0.0 <r> Saved\r\n"
UNKNOWN = b"550 5.1.1 <r> User doesn't exist\r\n"
FULL = b"452 4.2.2 <r> Mailbox is full\r\n"
NO_RCPTS = b"503 5.5.1 No valid recipients\r\n"


def r(wire: bytes) -> Reply:
    """The Reply a wire line parses to."""
    from lmtp.replies import ReplyParser

    (reply,) = ReplyParser().feed(wire)
    return reply


def next_event(proto: ClientProtocol) -> Event:
    event = proto.next_event()
    assert event is not NEED_DATA
    return event


def feed(proto: ClientProtocol, data: bytes) -> Event:
    proto.receive_data(data)
    return next_event(proto)


def ready(lhlo: bytes = LHLO_OK) -> ClientProtocol:
    """A protocol that has been greeted and whose LHLO was accepted."""
    proto = ClientProtocol()
    assert isinstance(feed(proto, GREETING), Greeting)
    assert proto.lhlo("gw.example") == b"LHLO gw.example\r\n"
    assert isinstance(feed(proto, lhlo), SessionReady)
    assert proto.state is State.READY
    return proto


def transact(
    proto: ClientProtocol,
    recipients: Sequence[str],
    envelope_replies: bytes,
    data_replies: bytes | None = None,
    *,
    expect_payload: bytes | None = None,
) -> tuple[Reply, ...]:
    """Run one transaction; the server answers with the given bytes."""
    proto.begin("a@example.org", recipients, MESSAGE)
    event = feed(proto, envelope_replies)
    if isinstance(event, SendPayload):
        assert event.data == (encode_data(MESSAGE) if expect_payload is None else expect_payload)
        assert data_replies is not None
        event = feed(proto, data_replies)
    assert isinstance(event, TransactionDone)
    assert proto.state is State.READY
    return event.results


# -- greeting and LHLO --------------------------------------------------------------


def test_nothing_happens_before_the_greeting() -> None:
    proto = ClientProtocol()
    assert proto.next_event() is NEED_DATA
    proto.receive_data(b"220 mx")
    assert proto.next_event() is NEED_DATA
    proto.receive_data(b" ready\r\n")
    event = proto.next_event()
    assert event == Greeting(Reply(220, None, ("mx ready",)))
    assert proto.state is State.GREETED


def test_lhlo_reply_records_extensions() -> None:
    proto = ClientProtocol()
    feed(proto, GREETING)
    proto.lhlo("gw.example")
    event = feed(proto, b"250-mx\r\n250-pipelining\r\n250-SIZE  1000 \r\n250 X-FOO a b\r\n")
    assert isinstance(event, SessionReady)
    assert event.extensions == {"PIPELINING": "", "SIZE": "1000", "X-FOO": "a b"}
    assert proto.extensions == event.extensions
    assert proto.lhlo_reply == event.reply


def test_blank_lhlo_lines_are_skipped() -> None:
    proto = ready(b"250-mx\r\n250-\r\n250- \r\n250 PIPELINING\r\n")
    assert proto.extensions == {"PIPELINING": ""}


def test_single_line_lhlo_reply_means_no_extensions() -> None:
    proto = ready(b"250 mx.example\r\n")
    assert proto.extensions == {}


@pytest.mark.parametrize(
    "greeting",
    [b"554 5.3.2 go away\r\n", b"421 4.3.2 too busy\r\n", b"250 not a greeting\r\n"],
)
def test_bad_greeting_is_server_unavailable(greeting: bytes) -> None:
    proto = ClientProtocol()
    proto.receive_data(greeting)
    with pytest.raises(ServerUnavailable) as info:
        proto.next_event()
    assert info.value.reply == r(greeting)
    assert info.value.temporary
    assert proto.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        proto.next_event()


@pytest.mark.parametrize(
    "reply", [b"500 5.5.1 Unknown command\r\n", b"421 4.3.2 bye\r\n", b"451 later\r\n"]
)
def test_refused_lhlo_is_server_unavailable(reply: bytes) -> None:
    proto = ClientProtocol()
    feed(proto, GREETING)
    proto.lhlo("gw")
    proto.receive_data(reply)
    with pytest.raises(ServerUnavailable):
        proto.next_event()


def test_eof_before_greeting_is_connection_lost() -> None:
    proto = ClientProtocol()
    proto.receive_data(b"")
    with pytest.raises(ConnectionLost):
        proto.next_event()


@pytest.mark.parametrize("name", ["", "gw example", "gw\r\nRSET", "gw\x00", "grüße.example"])
def test_invalid_lhlo_name(name: str) -> None:
    proto = ClientProtocol()
    feed(proto, GREETING)
    with pytest.raises(LocalProtocolError):
        proto.lhlo(name)
    assert proto.state is State.GREETED


def test_lhlo_before_greeting_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ClientProtocol().lhlo("gw")


# -- the envelope -------------------------------------------------------------------


def test_envelope_is_one_pipelined_buffer() -> None:
    proto = ready()
    wire = proto.begin("a@example.org", ["b@example.net", "c@example.net"], MESSAGE)
    assert wire == (
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\n"
        b"DATA\r\n"
    )
    assert proto.state is State.AWAIT_ENVELOPE


def test_null_sender() -> None:
    assert ready().begin("", ["b@x"], MESSAGE).startswith(b"MAIL FROM:<>\r\n")


@pytest.mark.parametrize(
    ("extensions", "smtputf8", "eight_bit", "mail"),
    [
        (LHLO_OK, False, False, b"MAIL FROM:<a@x>\r\n"),
        (LHLO_OK, False, True, b"MAIL FROM:<a@x> BODY=8BITMIME\r\n"),
        (LHLO_OK, True, False, b"MAIL FROM:<a@x> SMTPUTF8\r\n"),
        (LHLO_OK, True, True, b"MAIL FROM:<a@x> BODY=8BITMIME SMTPUTF8\r\n"),
        # 8BITMIME not advertised: the parameter is left out, the data still goes
        (b"250-mx\r\n250 SMTPUTF8\r\n", True, True, b"MAIL FROM:<a@x> SMTPUTF8\r\n"),
    ],
)
def test_mail_parameters_follow_the_lhlo_extensions(
    extensions: bytes, smtputf8: bool, eight_bit: bool, mail: bytes
) -> None:
    proto = ready(extensions)
    wire = proto.begin("a@x", ["b@x"], MESSAGE, smtputf8=smtputf8, eight_bit=eight_bit)
    assert wire.startswith(mail)


def test_smtputf8_sends_utf8_addresses() -> None:
    proto = ready()
    wire = proto.begin("jörg@bücher.example", ["δοκιμή@παράδειγμα.δοκιμή"], MESSAGE, smtputf8=True)
    assert "RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>".encode() in wire


def test_smtputf8_without_the_extension_is_refused_before_writing() -> None:
    proto = ready(b"250-mx\r\n250 8BITMIME\r\n")
    with pytest.raises(ExtensionNotSupported) as info:
        proto.begin("a@x", ["b@x"], MESSAGE, smtputf8=True)
    assert info.value.extension == "SMTPUTF8"
    assert not info.value.temporary
    assert proto.state is State.READY
    assert transact(proto, ["b@x"], OK_MAIL + OK_RCPT + GO, DELIVERED) == (r(DELIVERED),)


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        ("a@x", []),
        ("a@x", [""]),
        ("a@x\r\nRCPT TO:<evil@x>", ["b@x"]),
        ("a@x", ["b@x\nDATA"]),
        ("a@x", ["b@x\x00"]),
        ("a@x> SMTPUTF8", ["b@x"]),
        ("a@x", ["<b@x>"]),
        ("jörg@x", ["b@x"]),  # non-ASCII without smtputf8
        ("a@x", ["b@x", "ü@x"]),
    ],
)
def test_bad_transactions_are_local_errors_and_change_nothing(
    sender: str, recipients: list[str]
) -> None:
    proto = ready()
    with pytest.raises(LocalProtocolError) as info:
        proto.begin(sender, recipients, MESSAGE)
    assert not info.value.temporary
    assert proto.state is State.READY
    assert transact(proto, ["b@x"], OK_MAIL + OK_RCPT + GO, DELIVERED) == (r(DELIVERED),)


@pytest.mark.parametrize("state", ["fresh", "greeted", "in transaction"])
def test_begin_out_of_sequence_is_a_local_error(state: str) -> None:
    proto = ClientProtocol()
    if state != "fresh":
        feed(proto, GREETING)
    if state == "in transaction":
        proto.lhlo("gw")
        feed(proto, LHLO_OK)
        proto.begin("a@x", ["b@x"], MESSAGE)
    before = proto.state
    with pytest.raises(LocalProtocolError):
        proto.begin("a@x", ["b@x"], MESSAGE)
    assert proto.state is before


# -- per-recipient outcomes ---------------------------------------------------------


def test_all_recipients_delivered() -> None:
    proto = ready()
    results = transact(
        proto,
        ["b@x", "c@x", "d@x"],
        OK_MAIL + OK_RCPT * 3 + GO,
        b"250 2.0.0 b ok\r\n250 2.0.0 c ok\r\n250 2.0.0 d ok\r\n",
    )
    assert [x.text for x in results] == ["b ok", "c ok", "d ok"]
    assert all(x.is_positive for x in results)


def test_mixed_rcpt_replies_then_one_reply_per_accepted_recipient() -> None:
    proto = ready()
    results = transact(
        proto,
        ["ok1@x", "unknown@x", "ok2@x", "full@x", "ok3@x"],
        OK_MAIL + OK_RCPT + UNKNOWN + OK_RCPT + FULL + OK_RCPT + GO,
        # three accepted recipients, three replies, in RCPT order
        b"250 2.0.0 ok1 saved\r\n452 4.2.2 ok2 over quota\r\n550 5.7.1 ok3 sieve refused\r\n",
    )
    assert [(x.code, x.text) for x in results] == [
        (250, "ok1 saved"),
        (550, "<r> User doesn't exist"),
        (452, "ok2 over quota"),
        (452, "<r> Mailbox is full"),
        (550, "ok3 sieve refused"),
    ]


def test_post_data_replies_may_arrive_one_at_a_time() -> None:
    proto = ready()
    proto.begin("a@x", ["b@x", "c@x"], MESSAGE)
    assert isinstance(feed(proto, OK_MAIL + OK_RCPT * 2 + GO), SendPayload)
    assert proto.data_sent
    proto.receive_data(DELIVERED)
    assert proto.next_event() is NEED_DATA  # one of two
    assert proto.partial_results() == (r(DELIVERED), None)
    event = feed(proto, FULL)
    assert isinstance(event, TransactionDone)
    assert event.results == (r(DELIVERED), r(FULL))


def test_duplicate_recipients_get_one_result_each() -> None:
    results = transact(ready(), ["b@x", "b@x"], OK_MAIL + OK_RCPT * 2 + GO, DELIVERED + DELIVERED)
    assert len(results) == 2


@pytest.mark.parametrize("mail", [b"550 5.7.1 Sender refused\r\n", b"451 4.3.0 try later\r\n"])
def test_refused_mail_gives_every_recipient_that_reply(mail: bytes) -> None:
    proto = ready()
    results = transact(
        proto,
        ["b@x", "c@x"],
        mail + b"503 5.5.1 MAIL first\r\n" * 2 + b"503 5.5.1 MAIL first\r\n",
    )
    assert results == (r(mail), r(mail))
    # the next transaction starts with RSET, pipelined with the rest
    wire = proto.begin("a@x", ["b@x"], MESSAGE)
    assert wire.startswith(b"RSET\r\nMAIL FROM:<a@x>\r\n")
    event = feed(proto, b"250 2.0.0 Ok\r\n" + OK_MAIL + OK_RCPT + GO)
    assert isinstance(event, SendPayload)
    assert isinstance(feed(proto, DELIVERED), TransactionDone)
    # and a successful transaction needs no RSET after it
    assert proto.begin("a@x", ["b@x"], MESSAGE).startswith(b"MAIL")


def test_refused_mail_beats_a_confused_server_that_accepts_rcpt() -> None:
    mail = b"550 5.7.1 no\r\n"
    results = transact(ready(), ["b@x"], mail + OK_RCPT + NO_RCPTS)
    assert results == (r(mail),)


def test_refused_mail_with_354_sends_a_lone_dot() -> None:
    mail = b"550 5.7.1 no\r\n"
    proto = ready()
    results = transact(
        proto,
        ["b@x"],
        mail + b"503 5.5.1 no\r\n" + GO,
        b"554 5.5.1 No valid recipients\r\n",
        expect_payload=b".\r\n",
    )
    assert results == (r(mail),)
    assert not proto.data_sent


def test_refused_data_applies_to_the_accepted_recipients() -> None:
    proto = ready()
    data = b"451 4.3.0 Temporary storage failure\r\n"
    results = transact(proto, ["b@x", "c@x", "d@x"], OK_MAIL + OK_RCPT + UNKNOWN + OK_RCPT + data)
    assert results == (r(data), r(UNKNOWN), r(data))
    assert proto.begin("a@x", ["b@x"], MESSAGE).startswith(b"RSET\r\n")


def test_no_recipient_accepted_and_data_refused() -> None:
    proto = ready()
    results = transact(proto, ["b@x", "c@x"], OK_MAIL + UNKNOWN + FULL + NO_RCPTS)
    assert results == (r(UNKNOWN), r(FULL))
    assert proto.begin("a@x", ["b@x"], MESSAGE).startswith(b"RSET\r\n")


def test_no_recipient_accepted_but_354_sends_a_lone_dot_and_discards_its_reply() -> None:
    proto = ready()
    results = transact(
        proto,
        ["b@x", "c@x"],
        OK_MAIL + UNKNOWN + FULL + GO,
        b"250 2.0.0 Ok (empty message, nobody to deliver to)\r\n",
        expect_payload=b".\r\n",
    )
    assert results == (r(UNKNOWN), r(FULL))
    assert not proto.data_sent
    assert proto.begin("a@x", ["b@x"], MESSAGE).startswith(b"RSET\r\n")


def test_many_transactions_on_one_connection() -> None:
    proto = ready()
    for i in range(20):
        results = transact(proto, [f"u{i}@x"], OK_MAIL + OK_RCPT + GO, DELIVERED)
        assert results == (r(DELIVERED),)


def test_whole_session_fed_one_byte_at_a_time() -> None:
    proto = ClientProtocol()
    script = GREETING
    events: list[Event] = []

    def pump(data: bytes) -> None:
        for i in range(len(data)):
            proto.receive_data(data[i : i + 1])
            while proto.state is not State.CLOSED:
                event = proto.next_event()
                if event is NEED_DATA:
                    break
                events.append(event)

    pump(script)
    proto.lhlo("gw")
    pump(LHLO_OK)
    proto.begin("a@x", ["b@x", "c@x", "d@x"], MESSAGE)
    pump(OK_MAIL + OK_RCPT + UNKNOWN + OK_RCPT + GO)
    pump(DELIVERED + FULL)
    proto.quit()
    pump(b"221 2.0.0 Bye\r\n")
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "Greeting",
        "SessionReady",
        "SendPayload",
        "TransactionDone",
        "ConnectionClosed",
    ]
    done = events[3]
    assert isinstance(done, TransactionDone)
    assert done.results == (r(DELIVERED), r(UNKNOWN), r(FULL))


# -- errors mid-session -------------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "partial", "data_sent"),
    [
        (b"421 4.3.2 Shutting down\r\n", (None, None), False),  # at MAIL
        (OK_MAIL + OK_RCPT + b"421 4.3.2 bye\r\n", (None, None), False),  # at RCPT
        (OK_MAIL + UNKNOWN + b"421 4.3.2 bye\r\n", (r(UNKNOWN), None), False),
        (OK_MAIL + OK_RCPT * 2 + b"421 4.3.2 bye\r\n", (None, None), False),  # at DATA
    ],
)
def test_421_before_the_payload(
    replies: bytes, partial: tuple[Reply | None, ...], data_sent: bool
) -> None:
    proto = ready()
    proto.begin("a@x", ["b@x", "c@x"], MESSAGE)
    proto.receive_data(replies)
    with pytest.raises(ServerUnavailable) as info:
        proto.next_event()
    assert info.value.reply is not None and info.value.reply.code == 421
    assert info.value.partial_results == partial
    assert info.value.data_sent is data_sent
    assert proto.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        proto.begin("a@x", ["b@x"], MESSAGE)


def test_421_after_the_payload_keeps_the_replies_already_received() -> None:
    proto = ready()
    proto.begin("a@x", ["b@x", "c@x", "d@x"], MESSAGE)
    assert isinstance(feed(proto, OK_MAIL + OK_RCPT * 3 + GO), SendPayload)
    proto.receive_data(DELIVERED + b"421 4.3.2 Shutting down\r\n")
    with pytest.raises(ServerUnavailable) as info:
        proto.next_event()
    assert info.value.partial_results == (r(DELIVERED), None, None)
    assert info.value.data_sent is True
    assert info.value.any_reply


def test_mail_refused_then_421_keeps_the_refusal_for_everyone() -> None:
    proto = ready()
    proto.begin("a@x", ["b@x", "c@x"], MESSAGE)
    proto.receive_data(b"550 5.7.1 no\r\n421 4.3.2 bye\r\n")
    with pytest.raises(ServerUnavailable) as info:
        proto.next_event()
    assert info.value.partial_results == (r(b"550 5.7.1 no\r\n"),) * 2


@pytest.mark.parametrize(
    ("before_eof", "partial", "data_sent"),
    [
        (b"", (None, None), False),
        (OK_MAIL + UNKNOWN, (r(UNKNOWN), None), False),
        (OK_MAIL + OK_RCPT * 2 + GO + DELIVERED, (r(DELIVERED), None), True),
        (OK_MAIL + OK_RCPT * 2 + GO + b"250 2.0.0 half a li", (None, None), True),
    ],
)
def test_eof_mid_transaction_is_connection_lost_with_progress(
    before_eof: bytes, partial: tuple[Reply | None, ...], data_sent: bool
) -> None:
    proto = ready()
    proto.begin("a@x", ["b@x", "c@x"], MESSAGE)
    if before_eof:
        proto.receive_data(before_eof)
    proto.receive_data(b"")
    with pytest.raises(ConnectionLost) as info:
        while proto.next_event() is not NEED_DATA:
            pass
    assert info.value.partial_results == partial
    assert info.value.data_sent is data_sent


@pytest.mark.parametrize(
    "replies",
    [
        b"garbage\r\n",
        b"354 go ahead\r\n",  # to MAIL
        OK_MAIL + b"354 what\r\n",  # to RCPT
        OK_MAIL + OK_RCPT + b"250 2.0.0 DATA without data?\r\n",
        OK_MAIL + OK_RCPT + b"334 huh\r\n",
        OK_MAIL + OK_RCPT + GO + GO,  # 354 after the payload
        OK_MAIL + OK_RCPT + b"250-a\r\n251 b\r\n",
    ],
)
def test_malformed_or_unexpected_replies_are_remote_errors(replies: bytes) -> None:
    proto = ready()
    proto.begin("a@x", ["b@x"], MESSAGE)
    proto.receive_data(replies)
    with pytest.raises(RemoteProtocolError):
        while proto.next_event() is not NEED_DATA:
            pass
    assert proto.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        proto.next_event()


def test_bytes_after_a_malformed_reply_are_ignored_until_it_is_reported() -> None:
    proto = ready()
    proto.begin("a@x", ["b@x"], MESSAGE)
    proto.receive_data(OK_MAIL + b"bogus\r\n")
    proto.receive_data(OK_RCPT + GO)  # must not raise, nor resynchronise
    assert proto.has_pending_input
    with pytest.raises(RemoteProtocolError, match="malformed"):
        proto.next_event()


def test_intermediate_reply_after_a_lone_dot_is_a_remote_error() -> None:
    proto = ready()
    proto.begin("a@x", ["b@x"], MESSAGE)
    assert feed(proto, OK_MAIL + UNKNOWN + GO) == SendPayload(b".\r\n")
    proto.receive_data(GO)
    with pytest.raises(RemoteProtocolError):
        proto.next_event()


def test_refused_rset_is_a_remote_error() -> None:
    proto = ready()
    transact(proto, ["b@x"], b"550 5.7.1 no\r\n" + b"503 no\r\n" * 2)
    proto.begin("a@x", ["b@x"], MESSAGE)
    proto.receive_data(b"500 5.5.1 what RSET?\r\n")
    with pytest.raises(RemoteProtocolError, match="RSET"):
        proto.next_event()
    assert proto.partial_results() == (None,)


def test_421_to_rset_is_server_unavailable() -> None:
    proto = ready()
    transact(proto, ["b@x"], b"550 5.7.1 no\r\n" + b"503 no\r\n" * 2)
    proto.begin("a@x", ["b@x"], MESSAGE)
    proto.receive_data(b"421 4.3.2 bye\r\n")
    with pytest.raises(ServerUnavailable):
        proto.next_event()


# -- idle connections ---------------------------------------------------------------


def test_idle_connection_closed_by_the_server() -> None:
    proto = ready()
    assert proto.is_idle
    proto.receive_data(b"")
    assert not proto.is_idle
    with pytest.raises(ConnectionLost):
        proto.begin("a@x", ["b@x"], MESSAGE)
    assert proto.state is State.ERROR


def test_eof_while_idle_is_a_clean_close_for_next_event() -> None:
    proto = ready()
    proto.receive_data(b"")
    assert proto.next_event() == ConnectionClosed(None)
    assert proto.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        proto.next_event()


def test_unsolicited_421_while_idle() -> None:
    proto = ready()
    proto.receive_data(b"421 4.4.2 Idle timeout, closing\r\n")
    assert proto.has_pending_input and not proto.is_idle
    with pytest.raises(ServerUnavailable) as info:
        proto.begin("a@x", ["b@x"], MESSAGE)
    assert info.value.partial_results == ()


@pytest.mark.parametrize("junk", [b"250 2.0.0 surprise\r\n", b"250 half", b"bogus\r\n"])
def test_unsolicited_data_while_idle_is_a_remote_error(junk: bytes) -> None:
    proto = ready()
    proto.receive_data(junk)
    with pytest.raises(RemoteProtocolError):
        proto.begin("a@x", ["b@x"], MESSAGE)


def test_extra_reply_after_a_transaction_makes_the_connection_not_idle() -> None:
    proto = ready()
    transact(proto, ["b@x"], OK_MAIL + OK_RCPT + GO, DELIVERED + b"250 2.0.0 extra\r\n")
    assert proto.has_pending_input
    assert not proto.is_idle


def test_data_after_eof_is_a_local_error() -> None:
    proto = ClientProtocol()
    proto.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        proto.receive_data(b"220 late\r\n")


# -- QUIT ---------------------------------------------------------------------------


def test_quit() -> None:
    proto = ready()
    assert proto.quit() == b"QUIT\r\n"
    assert proto.state is State.AWAIT_QUIT
    assert feed(proto, b"221 2.0.0 Bye\r\n") == ConnectionClosed(Reply(221, "2.0.0", ("Bye",)))
    assert proto.state.value == "closed"


def test_quit_answered_by_eof_or_421_is_fine() -> None:
    proto = ready()
    proto.quit()
    assert feed(proto, b"") == ConnectionClosed(None)
    proto = ready()
    proto.quit()
    assert isinstance(feed(proto, b"421 4.3.2 bye\r\n"), ConnectionClosed)


def test_quit_right_after_the_greeting() -> None:
    proto = ClientProtocol()
    feed(proto, GREETING)
    assert proto.quit() == b"QUIT\r\n"


def test_quit_mid_transaction_is_a_local_error() -> None:
    proto = ready()
    proto.begin("a@x", ["b@x"], MESSAGE)
    with pytest.raises(LocalProtocolError):
        proto.quit()


def test_quit_does_not_send_a_pending_rset() -> None:
    proto = ready()
    transact(proto, ["b@x"], b"550 5.7.1 no\r\n" + b"503 no\r\n" * 2)
    assert proto.quit() == b"QUIT\r\n"


# -- model-based property -----------------------------------------------------------

rcpt_codes = st.sampled_from([250, 250, 250, 452, 550])
final_codes = st.sampled_from([250, 250, 451, 452, 550, 552])


@given(
    n=st.integers(1, 6),
    mail_code=st.sampled_from([250, 250, 250, 451, 550]),
    data_code=st.sampled_from([354, 354, 354, 451, 554]),
    data=st.data(),
)
def test_results_always_align_with_recipients(
    n: int, mail_code: int, data_code: int, data: st.DataObject
) -> None:
    rcpts = data.draw(st.lists(rcpt_codes, min_size=n, max_size=n))
    finals = data.draw(st.lists(final_codes, min_size=n, max_size=n))
    recipients = [f"u{i}@x" for i in range(n)]

    def line(code: int, what: str) -> bytes:
        klass = code // 100
        enhanced = f"{klass}.0.0 " if klass != 3 else ""
        return f"{code} {enhanced}{what}\r\n".encode()

    # What a conforming server would answer, given these decisions.
    accepted = [i for i, c in enumerate(rcpts) if c == 250] if mail_code == 250 else []
    if mail_code != 250:
        rcpt_lines = [line(503, "need MAIL") for _ in rcpts]
    else:
        rcpt_lines = [line(c, f"rcpt {i}") for i, c in enumerate(rcpts)]
    data_reply_code = data_code if accepted else 503
    envelope = line(mail_code, "mail") + b"".join(rcpt_lines) + line(data_reply_code, "data")
    post = b"".join(line(finals[i], f"final {i}") for i in accepted)

    # The expected outcome per recipient.
    expected: list[tuple[int, str]] = []
    for i, c in enumerate(rcpts):
        if mail_code != 250:
            expected.append((mail_code, "mail"))
        elif c != 250:
            expected.append((c, f"rcpt {i}"))
        elif data_code != 354:
            expected.append((data_code, "data"))
        else:
            expected.append((finals[i], f"final {i}"))

    # Feed the server's bytes in arbitrary pieces.
    proto = ready()
    proto.begin("a@x", recipients, MESSAGE)
    stream = envelope
    events: list[Event] = []
    payload_sent = False
    while True:
        if not stream:
            assert not payload_sent, "client waits for replies the server never sends"
            stream, payload_sent = post, True
        size = data.draw(st.integers(1, max(1, len(stream))))
        proto.receive_data(stream[:size])
        stream = stream[size:]
        while (event := proto.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, SendPayload):
                assert event.data == encode_data(MESSAGE)
                assert not stream
        if events and isinstance(events[-1], TransactionDone):
            break
    done = events[-1]
    assert isinstance(done, TransactionDone)
    assert [(x.code, x.text) for x in done.results] == expected
    assert proto.is_idle
    reset = proto.begin("a@x", ["b@x"], MESSAGE).startswith(b"RSET")
    assert reset == (mail_code != 250 or not accepted or data_code != 354)
