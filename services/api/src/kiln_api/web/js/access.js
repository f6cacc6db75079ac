// Who may do what: the role each operation needs, as the API publishes it (x-kiln-access in its OpenAPI
// document, the same table it enforces), against the signed-in user's role in each project. The page only uses
// this to leave out buttons and forms that would be refused; the API decides.

const RANK = {viewer: 1, member: 2, admin: 3};
export const CREATE = ["post", "/api/v1/jobs"];
export const START = ["post", "/api/v1/jobs/{job_id}/start"];
export const CANCEL = ["post", "/api/v1/jobs/{job_id}/cancel"];
export const RERUN = ["post", "/api/v1/jobs/{job_id}/rerun"];

export class Access {
  /** `user` as GET /api/v1/me answers; `projects` as GET /api/v1/projects does (each with the caller's role). */
  constructor(openapi, user, projects) {
    this.openapi = openapi;
    this.user = user;
    this.update(projects);
  }

  update(projects) {
    this.roles = new Map(projects.map((p) => [p.id, p.role]));
  }

  /** Project ids the user may read, in the API's order. */
  projects() {
    return [...this.roles.keys()];
  }

  /** The user's role in `project` (the owner is an admin of every project); null: none. */
  role(project) {
    return this.user.is_owner ? "admin" : this.roles.get(project) || this.user.roles?.[project] || null;
  }

  /** The role an operation needs ("viewer", "member", "admin"), or another need ("user", "owner", ...). */
  need([method, path]) {
    return this.openapi.paths?.[path]?.[method]?.["x-kiln-access"]?.need || null;
  }

  /** Whether the user's role in `project` is enough for the operation [method, path]. */
  may(operation, project) {
    const need = this.need(operation);
    if (!(need in RANK)) return true;  // not a project role: the API answers for itself
    const role = this.role(project);
    return Boolean(role) && RANK[role] >= RANK[need];
  }

  /** Projects in which the user may do the operation. */
  allowing(operation) {
    return this.projects().filter((p) => this.may(operation, p));
  }

  /** Why the operation is not for this user in `project`, in the API's words. */
  why(operation, project) {
    const need = this.need(operation);
    const role = this.role(project);
    return `your role in project ${project} is ${role || "none"}; ${need === "admin" ? "admin" : `${need} or admin`}`
      + " is needed";
  }
}
