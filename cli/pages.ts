/**
 * Every page of a List RPC (AIP-158 page tokens): the one loop `tml ... list`
 * commands read their whole listing with.
 */

/** Calls `page(token)` from the empty token until a page has no next token; returns every item in order. */
export async function allPages<T>(page: (pageToken: string) => Promise<{ items: T[]; nextPageToken: string }>): Promise<T[]> {
  const found: T[] = [];
  let pageToken = "";
  do {
    const next = await page(pageToken);
    found.push(...next.items);
    pageToken = next.nextPageToken;
  } while (pageToken !== "");
  return found;
}
