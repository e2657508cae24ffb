"""People and customers: users, passwords, browser sessions, CSRF, single sign-on, API tokens,
customers, support consent, login throttling, and the scoping every service applies."""
