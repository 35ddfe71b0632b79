// HS256 user tokens signed inside k6, with the secret the nodes share (LOCKSTEP_JWT_SECRET).
// A cluster with a JWT key has no /v1/dev/token endpoint, and a token signed with the shared
// secret works on every node, which is what a VU that moves between nodes needs.

import crypto from 'k6/crypto';
import encoding from 'k6/encoding';

function b64url(s) {
  return encoding.b64encode(s, 'rawurl');
}

// Signs `claims` (an object) with HS256 and `secret` (a string); returns the compact JWT.
export function signHS256(claims, secret) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = crypto.hmac('sha256', secret, `${head}.${body}`, 'base64rawurl');
  return `${head}.${body}.${sig}`;
}

// A user token as lockstep reads it: `sub`, `name`, `rooms` (pattern -> role), `exp`.
export function userToken(secret, sub, name, rooms, ttlSeconds) {
  const now = Math.floor(Date.now() / 1000);
  return signHS256({ sub, name, rooms, iat: now, exp: now + (ttlSeconds || 3 * 3600) }, secret);
}
