"""Named SMTP replies: code, enhanced status code (RFC 3463) and bland text.

Peers see only these texts plus a session or queue id; the detail of why goes to the
logs. Keeping them in one place keeps the wording consistent and reviewable.
"""

from __future__ import annotations

from filters.base import Reply

# Connection
SERVICE_UNAVAILABLE = Reply(421, "4.3.2", "Service not available, closing channel")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
SESSION_TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
SESSION_TOO_LONG = Reply(421, "4.4.2", "Session too long, closing connection")

# Command syntax and sequence
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_LF_COMMAND = Reply(500, "5.5.2", "Command line must end with CRLF")
UNRECOGNISED = Reply(500, "5.5.2", "Command not recognized")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(553, "5.1.7", "Sender address syntax error")
BAD_RECIPIENT_SYNTAX = Reply(553, "5.1.3", "Recipient address syntax error")
PARAM_NOT_RECOGNISED = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
VRFY_NOTHING = Reply(252, "2.5.0", "Cannot verify the user, but will accept mail and try")
EXPN_NOTHING = Reply(502, "5.5.1", "EXPN not available")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Address requires SMTPUTF8")

# Transaction
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Reset ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
BARE_CR_LF_DATA = Reply(550, "5.6.11", "Message contains bare CR or LF (RFC 5321 2.3.8)")
DATA_TOO_SLOW = Reply(451, "4.4.2", "Data rate too low, closing connection")
TRANSACTION_TOO_LONG = Reply(451, "4.4.2", "Transaction took too long, closing connection")

# Recipients (RCPT is where refusals belong: nothing bounces later)
NO_SUCH_USER = Reply(550, "5.1.1", "Recipient address rejected: no such user")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
MAILBOX_DISABLED = Reply(550, "5.2.1", "Recipient mailbox disabled")
OVER_QUOTA = Reply(452, "4.2.2", "Recipient mailbox full, try again later")
DIRECTORY_UNAVAILABLE = Reply(451, "4.4.3", "Recipient lookup temporarily unavailable")
FORWARD_UNAVAILABLE = Reply(451, "4.3.0", "Recipient forwards elsewhere: not accepted yet")

# Local trouble
LOCAL_ERROR = Reply(451, "4.3.0", "Temporary local problem, try again later")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")

# Default replies when a filter gives a verdict without its own reply
DEFAULT_TEMPFAIL = Reply(451, "4.7.1", "Temporarily rejected, try again later")
DEFAULT_REJECT = Reply(550, "5.7.1", "Rejected by policy")
DEFAULT_MESSAGE_REJECT = Reply(554, "5.7.1", "Message rejected by policy")
