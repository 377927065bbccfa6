-- Endpoint identity (issue 8): an enrolled endpoint is bound to its agent's TLS certificate
-- (sha256 pin) and to a random nonce from which the server derives the agent's credential with the
-- key in agents.key (outside this database). The agent's API token is no longer stored: nothing
-- here lets anyone call an agent. Endpoints registered before this migration enroll again at their
-- next heartbeat.
ALTER TABLE endpoints DROP COLUMN api_token;
ALTER TABLE endpoints ADD COLUMN cert_sha256 TEXT;
ALTER TABLE endpoints ADD COLUMN identity_nonce TEXT;
ALTER TABLE endpoints ADD COLUMN enrolled_ms INTEGER;
