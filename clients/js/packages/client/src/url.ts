/** The WebSocket URL: `http(s)`→`ws(s)`, `/v1/ws` appended once, token and resume token as query parameters. */
export function socketUrl(base: string, token: string, resume: string | null): string {
  const u = new URL(base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  const path = u.pathname.replace(/\/+$/, "");
  u.pathname = path.endsWith("/v1/ws") ? path : `${path}/v1/ws`;
  u.searchParams.set("token", token);
  if (resume) u.searchParams.set("resume", resume);
  else u.searchParams.delete("resume");
  return u.toString();
}
