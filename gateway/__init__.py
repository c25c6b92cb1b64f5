"""mailedge gateway: the node: config, listeners, SMTP session, pipeline, spool, queue."""
