/**
 * Full-jitter reconnect delay, as centrifuge-js does it: a uniform draw between `min` and
 * `min(max, min + min·2^attempt)`, so a fleet of clients dropped together spreads out.
 */
export function backoffDelay(attempt: number, min: number, max: number, random: () => number = Math.random): number {
  const step = Math.min(Math.max(attempt, 0), 31);
  const ceiling = Math.min(max, min * 2 ** step);
  return Math.min(max, min + Math.floor(random() * ceiling));
}
