-- 0002_token_scope: API tokens are either a user's (scope 'user') or a
-- service credential for a store, cache, log server or proxy ('service').
alter table api_tokens
  add column scope text not null default 'user' check (scope in ('user', 'service'));
