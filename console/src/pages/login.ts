import { AuthService } from "../../../gen/treadmill/coordinator/v1/auth_service_pb.js";
import { errorText } from "../api.js";
import { h, notice } from "../dom.js";
import type { PageContext } from "../main.js";

/** User name and password -> AuthService.Login; the token goes to localStorage. */
export function loginPage({ app, api, main, query }: PageContext): void {
  document.title = "Log in · Treadmill";
  const next = query.get("next");
  const target = next && next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/login") ? next : "/jobs";
  const status = h("div", { class: "status-area" });
  if (app.flash) status.append(notice("info", app.flash));
  app.flash = "";
  const user = h("input", { id: "login-user", name: "username", autocomplete: "username", required: true, autocapitalize: "none", spellcheck: "false" });
  const password = h("input", { id: "login-password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit", class: "primary" }, "Log in");
  const form = h(
    "form",
    { class: "card login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title", tabindex: "-1" }, "Log in to Treadmill"),
    status,
    h("div", { class: "field" }, h("label", { for: "login-user" }, "User"), user),
    h("div", { class: "field" }, h("label", { for: "login-password" }, "Password"), password),
    submit,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    status.replaceChildren();
    try {
      const res = await api.client(AuthService).login({ name: user.value.trim(), password: password.value, description: "web console" }, { timeoutMs: 15_000 });
      if (!res.user || !res.info) throw new Error("the server returned no user");
      api.session.save(res.token, res.info.id, res.user);
      app.navigate(target, { replace: true });
    } catch (err) {
      status.replaceChildren(notice("error", errorText(err)));
      password.select();
      submit.disabled = false;
    }
  });
  main.append(form);
  if (api.session.current) status.append(notice("info", `You are logged in as ${api.session.current.userName}.`));
}
