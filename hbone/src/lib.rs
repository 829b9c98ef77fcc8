//! HBONE: HTTP/2 CONNECT tunnels over mutual TLS with SPIFFE identities.
