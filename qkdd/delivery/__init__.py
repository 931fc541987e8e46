"""Key delivery to applications: ETSI GS QKD 014 over mutual TLS, coordinated between the two daemons."""
